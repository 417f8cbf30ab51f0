"""Few-bit activation ops against torch's native ones: saved bytes and forward+backward time, side by side.

For GELU, SiLU, Tanh and SwiGLU (silu(a)*b) at bits in --bits, on --n elements (default 12.6M) of each
--dtype, on --device (cpu or cuda), at every thread count in --threads (CPU; default torch's own count):
saved bytes measured by the ruler (tightfit.memory.SavedTensorCounter, the shared derivative table
excluded) and wall time of forward and backward (the device synchronized around each phase). Variants are
interleaved round-robin for --repeats rounds: a variant's time is its median, and its ratio to torch is
given both as the ratio of medians and as the median of per-round ratios (paired: both ran in the same
round), with the sign test's verdict. On CUDA the achieved memory bandwidth of each phase is reported
(bytes the op must move / time) against the device's measured copy bandwidth and its nominal peak.
The fewbit backend is the default (`tightfit.fewbit.backend()`); --backends adds others for comparison,
and on the CPU a last table times the codec kernels alone per backend (native C, pure torch, and the
pure-torch code compiled by inductor), which is how the default was chosen.

    python -m benchmarks.fewbit.ops --repeats 21 --threads 1      # results fewbit_ops_t1
    python -m benchmarks.fewbit.ops --repeats 21 --threads 2      # results fewbit_ops_t2
    python -m benchmarks.fewbit.ops --ops --threads 1 2 --repeats 21 --results fewbit_kernels_t1_2
                                         # only the codec kernels and where the time goes, 1 and 2 threads
    python -m benchmarks.fewbit.ops --device cuda --dtype fp32 bf16 --n 1000000 12600000 100000000 \
        --bits 1 2 3 4 8 --no-kernels                              # results fewbit_ops_cuda

Results: benchmarks/results/latest/<--results, default fewbit_ops_t<threads> on the CPU, fewbit_ops_cuda
on CUDA>.{json,txt}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import tightfit.fewbit.codec as codec
from benchmarks.common import results
from benchmarks.common.timing import interleaved, paired_summary, wait_for_device
from benchmarks.common.timing import timed as timed_call
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


def _randn(n: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n, device=device, dtype=dtype).requires_grad_(True)


def inputs_for(fname: str, n: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    if fname == "SwiGLU":
        return (_randn(n, device, dtype), _randn(n, device, dtype))
    return (_randn(n, device, dtype),)


def timed(op, args, grad):
    for a in args:
        a.grad = None
    wait_for_device()
    t0 = time.perf_counter()
    y = op(*args)
    wait_for_device()
    t1 = time.perf_counter()
    y.backward(grad)
    wait_for_device()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NOMINAL_GBPS = {  # data-sheet memory bandwidth, GB/s
    "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800,
    "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "A100 80GB PCIe": 1935,
}


def nominal_gbps(name: str) -> float | None:
    """The data-sheet memory bandwidth (GB/s) of a known accelerator, by a part of its name, else None."""
    for key, gbps in NOMINAL_GBPS.items():
        if key in name:
            return gbps
    return None


def copy_gbps(device: str) -> float:
    """Measured device-memory bandwidth: a 1 GiB copy (read + write), best of 5, in GB/s."""
    src = torch.empty(1 << 28, device=device)
    dst = torch.empty_like(src)
    best = min(timed_call(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() * 4 / best / 1e9


def moved_bytes(fname: str, bits, n: int, es: int) -> tuple[int, int]:
    """(forward, backward) bytes the op, as implemented, must read and write at least (n elements of es
    bytes; codes of ceil(n*bits/8) bytes)."""
    if bits == "torch":
        if fname == "SwiGLU":  # s = silu(a); h = s * b / grad_b = g * s; g * b; silu_backward(g * b, a)
            return 5 * n * es, 9 * n * es
        return 2 * n * es, 3 * n * es  # read x, write y / read grad and x, write grad_x
    codes = (n * bits + 7) // 8
    if fname == "SwiGLU":  # s and codes of a, then h = s * b / grad_a in one pass over g, b, codes; g * s
        return 5 * n * es + codes, 6 * n * es + codes
    return 2 * n * es + codes, 2 * n * es + codes


def kernel_table(n: int, repeats: int) -> dict:
    """Where the time goes at this thread count: the codec kernels alone (4-bit encode, decode_mul) per
    backend (how the default was picked), torch's own activation kernels, and the cost of writing a fresh
    output buffer of n fp32 with ordinary pages and with the huge-page advice the native kernels give
    their outputs (`tightfit.fewbit._native.empty`)."""
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
    others = {  # (name, fn): torch's kernels and fresh-buffer writes, for the thread-scaling note
        "torch F.gelu (forward)": lambda: F.gelu(x),
        "torch gelu_backward": lambda: torch.ops.aten.gelu_backward(grad, x),
        "torch F.silu (forward)": lambda: F.silu(x),
        "torch silu_backward": lambda: torch.ops.aten.silu_backward(grad, x),
        "fresh fp32 buffer, written (4 KiB pages)": lambda: torch.empty(n).fill_(1.0),
        "fresh fp32 buffer, written (huge-page advice)": lambda: _native.empty(n, torch.float32).fill_(1.0),
    }

    def run(fns):  # noqa: ANN001, ANN202
        out = []
        for f in fns if isinstance(fns, tuple) else (fns,):
            t = time.perf_counter()
            f()
            out.append(time.perf_counter() - t)
        return tuple(out)

    items = list(kernels.values()) + list(others.values())
    rounds = interleaved(items, run, repeats, order="fixed")
    times = {name: tuple(zip(*r)) for name, r in zip(list(kernels) + list(others), rounds)}
    threads = torch.get_num_threads()
    print(
        f"\ncodec kernels alone, 4 bits, n={n:,} fp32, {threads} thread(s) "
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
    print(f"\n| where the time goes ({threads} thread(s), n={n:,} fp32) | ms |\n|---|---|")
    other_rows = []
    for name in others:
        ms = 1e3 * statistics.median(times[name][0])
        print(f"| {name} | {ms:.1f} |")
        other_rows.append({"what": name, "ms": ms})
    return {"bits": 4, "n": n, "threads": threads, "rounds": repeats, "inductor_compile_s": compile_s,
            "rows": rows, "where_the_time_goes": other_rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="*", default=[12_600_000])
    p.add_argument("--bits", type=int, nargs="*", default=[1, 2, 3, 4, 8])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, nargs="*", default=[torch.get_num_threads()],
                   help="CPU thread counts, each measured in turn (default: torch's own count)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", nargs="*", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--ops", nargs="*", default=["GELU", "SiLU", "Tanh", "SwiGLU"],
                   help="ops to time; a bare --ops: only the codec-kernel and where-the-time-goes tables")
    p.add_argument("--backends", nargs="*", default=["default"], help="default, native, torch, triton")
    p.add_argument("--inductor-check", action="store_true", help="also compile GELU(bits=2) with inductor")
    p.add_argument(
        "--no-kernels", action="store_true", help="skip the codec kernel table (native vs torch vs inductor)"
    )
    p.add_argument("--results", default=None,
                   help="name in results/latest/ (default fewbit_ops_t<threads> on CPU, fewbit_ops_cuda)")
    a = p.parse_args()
    if a.device == "cuda":
        a.threads = [torch.get_num_threads()]
    with results.Transcript() as transcript:
        data = run(a)
    default = f"fewbit_ops_t{'_'.join(map(str, a.threads))}" if a.device == "cpu" else "fewbit_ops_cuda"
    name = a.results or default
    results.say_written(results.write(name, data, text=transcript.text, device=a.device))


def run(a: argparse.Namespace) -> dict:
    """Measure and print every table, per thread count, dtype and size; return them for the results file."""
    default = codec.backend(a.device)
    backends = [default if b == "default" else b for b in a.backends]
    native = "ok" if _native.available() else _native.build_error()
    dev_name = results.device_name(a.device)
    print(f"command: {results.command_line()}")
    print(f"torch {torch.__version__}, device {dev_name}; default fewbit backend: {default} "
          f"(native build: {native}); thread counts: {a.threads}")
    settings = vars(a) | {"default_backend": default, "native_build": native, "device_name": dev_name}
    out = {"settings": settings, "runs": []}
    if a.device == "cuda":
        out["copy_gbps"] = copy_gbps(a.device)
        out["nominal_gbps"] = nominal_gbps(dev_name)
        print(f"device memory bandwidth: measured copy {out['copy_gbps']:.0f} GB/s, "
              f"nominal {out['nominal_gbps'] or 'unknown'} GB/s")
    for threads in a.threads:
        torch.set_num_threads(threads)
        for dname in a.dtype if a.ops else ():  # `--ops` alone: only the kernel tables below
            for n in a.n:
                out["runs"].append(run_one(a, threads, DTYPES[dname], n, backends, out.get("copy_gbps")))
        if a.device == "cpu" and not a.no_kernels:
            out.setdefault("kernels", {})[threads] = kernel_table(a.n[0], a.repeats)
    codec.set_backend(None)
    fewbit = codec.backend_notes()
    if fewbit:
        out["backend_notes"] = fewbit
    if a.inductor_check:
        out["inductor_check"] = inductor_check()
    return out


def run_one(a: argparse.Namespace, threads: int, dtype: torch.dtype, n: int, backends: list[str],
            copy: float | None) -> dict:
    torch.manual_seed(0)
    dev = a.device
    print(f"\n## {threads} thread(s), {dtype}, n={n:,}, device {dev}")
    variants = [v for v in make_variants(n, a.bits, backends) if v[0] in a.ops]
    inputs = {f: inputs_for(f, n, dev, dtype) for f in ("GELU", "SwiGLU")}
    inputs["SiLU"] = inputs["Tanh"] = inputs["GELU"]
    grad = torch.randn(n, device=dev, dtype=dtype)

    def use(backend: str) -> None:
        codec.set_backend(None if backend == "-" else backend)

    # saved bytes (exact, the ruler): count everything the op keeps, inputs included (torch keeps x)
    saved = {}
    for fname, bits, backend, op in variants:
        use(backend)
        with SavedTensorCounter() as c:
            y = op(*inputs[fname])
        saved[(fname, bits, backend)] = c.bytes
        del y

    def run_variant(variant):  # noqa: ANN001, ANN202
        fname, _bits, backend, op = variant
        use(backend)
        return timed(op, inputs[fname], grad)

    run_variant(variants[0])  # warm-up (lazy builds, first-use checks, CUDA context)
    for v in variants:
        run_variant(v)
    rounds = interleaved(variants, run_variant, a.repeats, order="fixed")
    times = {(f, b, k): r for (f, b, k, _), r in zip(variants, rounds)}
    use("-")

    def med(key):
        ts = times[key]
        return (
            statistics.median(f for f, _ in ts),
            statistics.median(b for _, b in ts),
            statistics.median(f + b for f, b in ts),
        )

    bw = dev == "cuda"
    print("| op | bits | backend | saved bytes | vs torch | fwd ms | bwd ms | fwd+bwd ms | time vs torch "
          "| paired (median of rounds) | faster rounds | verdict |"
          + (" fwd GB/s | bwd GB/s |" if bw else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if bw else ""))
    rows = []
    es = torch.empty((), dtype=dtype).element_size()
    for fname, bits, backend, _ in variants:
        base = (fname, "torch", "-")
        f, b, t = med((fname, bits, backend))
        tf = med(base)[2]
        sb, st = saved[(fname, bits, backend)], saved[base]
        summary = paired_summary([x + y for x, y in times[(fname, bits, backend)]],
                                 [x + y for x, y in times[base]])
        if bits == "torch":  # the baseline against itself
            summary |= {"faster_rounds": "-", "verdict": "baseline"}
        mf, mb = moved_bytes(fname, bits, n, es)
        gf, gb = mf / f / 1e9, mb / b / 1e9
        line = (f"| {fname} | {bits} | {backend} | {sb:,} | {sb / st:.4f} | {1e3 * f:.2f} | {1e3 * b:.2f} "
                f"| {1e3 * t:.2f} | {t / tf:.2f} | {summary['paired_ratio_median']:.2f} "
                f"| {summary['faster_rounds']}/{summary['rounds']} | {summary['verdict']} |")
        if bw:
            line += f" {gf:.0f} | {gb:.0f} |"
        print(line)
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
                **summary,
                "fwd_gbps": gf,
                "bwd_gbps": gb,
                "times_s": [list(x) for x in times[(fname, bits, backend)]],
            }
        )
    note = (f"\nmedians of {a.repeats} interleaved rounds; 'time vs torch' is the ratio of medians, "
            "'paired' the median of per-round ratios; saved bytes by tightfit.memory.SavedTensorCounter "
            "(the 2**bits-entry table is a shared constant and counted in the few-bit rows: 8-2048 bytes)")
    if bw:
        note += (f"; GB/s = the bytes each phase must move / its median time (copy bandwidth measured here: "
                 f"{copy:.0f} GB/s)")
    print(note)
    return {"threads": threads, "dtype": str(dtype), "n": n, "rows": rows}


def inductor_check() -> dict:
    import tightfit

    torch._dynamo.reset()
    m = tightfit.nn.GELU(bits=2)
    x = torch.randn(64, 33, requires_grad=True)
    t0 = time.time()
    y = torch.compile(m, fullgraph=True, backend="inductor")(x)
    y.sum().backward()
    t = m.table
    ok = torch.equal(y, F.gelu(x.detach())) and torch.equal(x.grad, t.levels.float()[t.encode(x.detach())])
    took = time.time() - t0
    print(f"\ninductor fullgraph check: {'OK' if ok else 'MISMATCH'} ({took:.0f} s incl. compile)")
    return {"ok": ok, "seconds": time.time() - t0}


if __name__ == "__main__":
    main()
