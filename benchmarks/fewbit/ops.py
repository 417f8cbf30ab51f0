"""Few-bit activation ops against torch's native ones: saved bytes and forward+backward time, side by side.

For GELU, SiLU, Tanh and SwiGLU (silu(a)*b) at bits in --bits, on --n fp32 elements (default 12.6M) on
CPU: saved bytes measured by the ruler (tightfit.memory.SavedTensorCounter, the shared derivative table
excluded) and wall time of forward and backward. Variants are interleaved round-robin for --repeats
rounds and the median is reported, so machine load hits every variant alike. The fewbit backend is the
default ('native' C kernels when they build, else 'torch'); --backends adds the pure-torch fallback for
comparison, and a last table times the codec kernels alone per backend (native C, pure torch, and the
pure-torch code compiled by inductor), which is how the default was chosen.

    python -m benchmarks.fewbit.ops --repeats 21 --threads 1      # results fewbit_ops_t1
    python -m benchmarks.fewbit.ops --repeats 21 --threads 2      # results fewbit_ops_t2

Results: benchmarks/results/latest/<--results, default fewbit_ops_t<threads>>.{json,txt}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import tightfit.fewbit.codec as codec
from benchmarks.common import results
from benchmarks.common.timing import interleaved
from tightfit.fewbit import _native
from tightfit.fewbit.functional import activation
from tightfit.fewbit.gated import swiglu
from tightfit.memory import SavedTensorCounter

FUNCS = {
    "GELU": (lambda x: F.gelu(x), "gelu"),
    "SiLU": (lambda x: F.silu(x), "silu"),
    "Tanh": (lambda x: torch.tanh(x), "tanh"),
}


def make_variants(n: int, bits_list: list[int], backends: list[str]):
    """(fn, bits, backend, step) where step(inputs) runs forward then backward and returns (t_fwd, t_bwd)."""
    out = []
    for fname, (ref, name) in FUNCS.items():

        def torch_op(x, ref=ref):
            return ref(x)

        out.append((fname, "torch", "-", torch_op))
        for backend in backends:
            for bits in bits_list:

                def ours(x, name=name, bits=bits):
                    return activation(x, name, bits)

                out.append((fname, bits, backend, ours))
    out.append(("SwiGLU", "torch", "-", lambda a, b: F.silu(a) * b))
    for backend in backends:
        for bits in bits_list:
            out.append(("SwiGLU", bits, backend, lambda a, b, bits=bits: swiglu(a, b, bits=bits)))
    return out


def inputs_for(fname: str, n: int):
    if fname == "SwiGLU":
        return (torch.randn(n, requires_grad=True), torch.randn(n, requires_grad=True))
    return (torch.randn(n, requires_grad=True),)


def timed(op, args, grad):
    for a in args:
        a.grad = None
    t0 = time.perf_counter()
    y = op(*args)
    t1 = time.perf_counter()
    y.backward(grad)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def kernel_table(n: int, repeats: int) -> dict:
    """The codec kernels alone (4-bit encode, decode_mul) per backend: how the default was picked."""
    x, grad = torch.randn(n), torch.randn(n)
    cmp = codec.compare_borders(torch.sort(torch.randn(15)).values, x.dtype, False)
    levels = torch.randn(16, dtype=torch.float64)
    packed = codec._encode_torch(x, cmp, 4)
    t0 = time.perf_counter()
    enc_c = torch.compile(codec._encode_torch, dynamic=False, fullgraph=True)
    dec_c = torch.compile(codec._decode_mul_torch, dynamic=False, fullgraph=True)
    enc_c(x, cmp, 4), dec_c(packed, levels, grad, 4)
    compile_s = time.perf_counter() - t0
    kernels = {
        "torch": (
            lambda: codec._encode_torch(x, cmp, 4),
            lambda: codec._decode_mul_torch(packed, levels, grad, 4),
        ),
        "inductor": (lambda: enc_c(x, cmp, 4), lambda: dec_c(packed, levels, grad, 4)),
    }
    if _native.available():
        kernels["native"] = (
            lambda: _native.encode(x, cmp, 4),
            lambda: _native.decode_mul(packed, levels, grad, 4),
        )
    want_dec = codec.decode_mul_reference(packed, levels, grad, 4)

    def run(fns):  # noqa: ANN001, ANN202
        out = []
        for f in fns:
            t = time.perf_counter()
            f()
            out.append(time.perf_counter() - t)
        return tuple(out)

    rounds = interleaved(list(kernels.values()), run, repeats, order="fixed")
    times = {name: tuple(zip(*r)) for name, r in zip(kernels, rounds)}
    print(
        f"\ncodec kernels alone, 4 bits, n={n:,} fp32 "
        f"(medians of {repeats}; inductor compile {compile_s:.0f} s)"
    )
    print("| backend | encode ms | decode_mul ms | same result as reference |")
    print("|---|---|---|---|")
    rows = []
    for name, (enc, dec) in kernels.items():
        same = torch.equal(enc(), packed) and torch.equal(dec(), want_dec)
        e, d = (1e3 * statistics.median(ts) for ts in times[name])
        print(f"| {name} | {e:.1f} | {d:.1f} | {'yes' if same else 'NO'} |")
        rows.append({"backend": name, "encode_ms": e, "decode_mul_ms": d, "same_as_reference": same})
    return {"bits": 4, "n": n, "rounds": repeats, "inductor_compile_s": compile_s, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=12_600_000)
    p.add_argument("--bits", type=int, nargs="*", default=[1, 2, 3, 4, 8])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backends", nargs="*", default=["default"], help="default, native, torch")
    p.add_argument("--inductor-check", action="store_true", help="also compile GELU(bits=2) with inductor")
    p.add_argument(
        "--no-kernels", action="store_true", help="skip the codec kernel table (native vs torch vs inductor)"
    )
    p.add_argument("--results", default=None, help="name in results/latest/ (default fewbit_ops_t<threads>)")
    a = p.parse_args()
    with results.Transcript() as transcript:
        data = run(a)
    name = a.results or f"fewbit_ops_t{a.threads}"
    results.say_written(results.write(name, data, text=transcript.text))


def run(a: argparse.Namespace) -> dict:
    """Measure and print every table; return them for the results file."""
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    default = codec.get_backend()
    backends = [default if b == "default" else b for b in a.backends]
    native = "ok" if _native.available() else _native.build_error()
    print(f"command: {results.command_line()}")
    print(
        f"torch {torch.__version__}, {a.threads} thread(s), n={a.n:,} fp32 elements; "
        f"default backend: {default}"
        f" (native build: {native})"
    )
    variants = make_variants(a.n, a.bits, backends)
    inputs = {f: inputs_for(f, a.n) for f in ("GELU", "SwiGLU")}
    inputs["SiLU"] = inputs["Tanh"] = inputs["GELU"]
    grad = torch.randn(a.n)

    # saved bytes (exact, the ruler): count everything the op keeps, inputs included (torch keeps x)
    saved = {}
    for fname, bits, backend, op in variants:
        codec.set_backend(backend if backend != "-" else "auto")
        args = inputs[fname]
        with SavedTensorCounter() as c:
            y = op(*args)
        saved[(fname, bits, backend)] = c.bytes
        del y
    # times: round robin over variants, median per variant
    def run_variant(variant):  # noqa: ANN001, ANN202
        fname, _bits, backend, op = variant
        codec.set_backend(backend if backend != "-" else "auto")
        return timed(op, inputs[fname], grad)

    rounds = interleaved(variants, run_variant, a.repeats, order="fixed")
    times = {(f, b, k): r for (f, b, k, _), r in zip(variants, rounds)}
    codec.set_backend("auto")

    def med(key):
        ts = times[key]
        return (
            statistics.median(f for f, _ in ts),
            statistics.median(b for _, b in ts),
            statistics.median(f + b for f, b in ts),
        )

    print("\n| op | bits | backend | saved bytes | vs torch | fwd ms | bwd ms | fwd+bwd ms | time vs torch |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for fname, bits, backend, _ in variants:
        base = (fname, "torch", "-")
        f, b, t = med((fname, bits, backend))
        tf = med(base)[2]
        sb, st = saved[(fname, bits, backend)], saved[base]
        print(
            f"| {fname} | {bits} | {backend} | {sb:,} | {sb / st:.4f} | {1e3 * f:.1f} | {1e3 * b:.1f} "
            f"| {1e3 * t:.1f} | {t / tf:.2f} |"
        )
        rows.append(
            {
                "op": fname,
                "bits": bits,
                "backend": backend,
                "saved_bytes": sb,
                "saved_vs_torch": sb / st,
                "fwd_ms": 1e3 * f,
                "bwd_ms": 1e3 * b,
                "fwd_bwd_ms": 1e3 * t,
                "time_vs_torch": t / tf,
                "times_s": [list(x) for x in times[(fname, bits, backend)]],
            }
        )
    print(
        f"\nmedians of {a.repeats} interleaved rounds; saved bytes by tightfit.memory.SavedTensorCounter "
        "(the 2**bits-entry table is a shared constant and counted in the few-bit rows: 8-2048 bytes)"
    )

    out = {
        "settings": vars(a) | {"default_backend": default, "native_build": native},
        "rows": rows,
    }
    if not a.no_kernels:
        out["kernels"] = kernel_table(a.n, a.repeats)

    if a.inductor_check:
        import tightfit

        torch._dynamo.reset()
        m = tightfit.nn.GELU(bits=2)
        x = torch.randn(64, 33, requires_grad=True)
        t0 = time.time()
        y = torch.compile(m, fullgraph=True, backend="inductor")(x)
        y.sum().backward()
        t = m.table
        ok = torch.equal(y, F.gelu(x.detach())) and torch.equal(
            x.grad, t.levels.float()[t.encode(x.detach())]
        )
        print(
            f"\ninductor fullgraph check: {'OK' if ok else 'MISMATCH'} "
            f"({time.time() - t0:.0f} s incl. compile)"
        )
        out["inductor_check"] = {"ok": ok, "seconds": time.time() - t0}
    return out


if __name__ == "__main__":
    main()
