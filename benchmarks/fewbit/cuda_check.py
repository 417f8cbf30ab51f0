"""The few-bit Triton backend on a real device: bit-for-bit checks against the reference codec, and which
forwards run fused.

On CUDA (or, with ``TRITON_INTERPRET=1 TIGHTFIT_FEWBIT_BACKEND=triton``, on CPU tensors through Triton's
interpreter, as a dry run): the backend each op gets (`tightfit.fewbit.backend`) and any fallback notes;
per activation (SiLU, GELU) and dtype (fp32, bf16, fp16) whether the fused forward kernel passes its
first-use check (bit-identical to torch's kernel on this device, so it is used) or not (torch's kernel
then one encoding pass); and for every code width 1..8, dtype and length (1, 7, 1,000,003, and a
non-contiguous input) that the packed codes, the backward (``levels[code] * grad``) and the gated
backward (``levels[code] * (grad * b)``) equal the pure-torch reference codec bit for bit. On CUDA also:
that a second forward+backward makes no synchronizing call (torch's sync debug mode), and with two or
more GPUs that tensors on cuda:1 while cuda:0 is current give the reference results.

    python -m benchmarks.fewbit.cuda_check                                        # fewbit_cuda_check
    TRITON_INTERPRET=1 TIGHTFIT_FEWBIT_BACKEND=triton python -m benchmarks.fewbit.cuda_check --device cpu \\
        --lengths 1 7 4099 --results fewbit_cuda_check_dryrun                      # CPU dry run

Exit status 1 when any check fails. Results: benchmarks/results/latest/<--results>.{json,txt}.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import tightfit
from benchmarks.common import results
from tightfit.fewbit import codec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_codec(device: str, lengths: list[int]) -> list[dict]:
    """Codes, backward and gated backward of the selected backend against the reference, every width."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for bits in range(1, 9):
        k = (1 << bits) - 1
        borders = torch.sort(torch.randn(k, dtype=torch.float64, generator=g) * 1.5).values
        levels = torch.randn(1 << bits, dtype=torch.float64, generator=g)
        for dname, dtype in DTYPES.items():
            for n in lengths:
                for layout in ("contiguous", "strided"):
                    if layout == "strided" and n > 10_000:
                        continue
                    base = (torch.randn(3, 2 * n, generator=g) * 2).to(dtype)
                    x = base[1, :n] if layout == "contiguous" else base.t()[::2, 1]
                    x[: min(n, 3)] = torch.tensor([float("nan"), float("inf"), -float("inf")])[: min(n, 3)]
                    grad, b = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
                    if n > 8:  # subnormal products: a flush-to-zero multiply would show here
                        grad[3:6] = torch.tensor([1e-38, -3e-39, 6e-5]).to(dtype)
                        b[3:6] = torch.tensor([0.01, 0.3, 1e-3]).to(dtype)
                    cmp = codec.compare_borders(borders, dtype, False)
                    want = codec._encode_torch(x, cmp, bits, 1)  # tested against encode_reference
                    got = codec.encode(x.to(device), borders.to(device), bits, False, 1).cpu()
                    codes_ok = torch.equal(got, want)
                    bwd_ok = torch.equal(
                        codec.decode_mul(want.to(device), levels, grad.to(device), bits).cpu(),
                        codec._decode_mul_torch(want, levels, grad, bits),
                    )
                    gated_ok = torch.equal(
                        codec.decode_mul(want.to(device), levels, grad.to(device), bits, b.to(device)).cpu(),
                        codec._decode_mul_torch(want, levels, grad, bits, b),
                    )
                    rows.append({"bits": bits, "dtype": dname, "n": n, "layout": layout, "codes": codes_ok,
                                 "backward": bwd_ok, "gated_backward": gated_ok})
    return rows


def check_ops(device: str) -> list[dict]:
    """tightfit.nn.GELU/SiLU and swiglu on the device: forward identical to torch, backward exact."""
    rows = []
    for dname, dtype in DTYPES.items():
        for name, mod, fn in (("gelu", tightfit.nn.GELU, F.gelu), ("silu", tightfit.nn.SiLU, F.silu)):
            x = (torch.randn(4097, device=device) * 3).to(dtype).requires_grad_(True)
            y = mod(bits=3)(x)
            t = tightfit.fewbit.get_table(name, 3)
            gr = torch.randn_like(y)
            y.backward(gr)
            xd = x.detach()
            fwd = torch.equal(y.detach(), fn(xd))
            bwd = torch.equal(x.grad, t.levels.to(device, dtype)[t.encode(xd)] * gr)
            rows.append({"op": name, "dtype": dname, "forward_identical": fwd, "backward_exact": bwd})
        a = torch.randn(4097, device=device).to(dtype).requires_grad_(True)
        bb = torch.randn(4097, device=device).to(dtype).requires_grad_(True)
        h = tightfit.fewbit.swiglu(a, bb, bits=3)
        gr = torch.randn_like(h)
        h.backward(gr)
        t = tightfit.fewbit.get_table("silu", 3)
        fwd = torch.equal(h.detach(), F.silu(a.detach()) * bb.detach())
        bwd = torch.equal(a.grad, t.levels.to(device, dtype)[t.encode(a.detach())] * (gr * bb.detach()))
        rows.append({"op": "swiglu", "dtype": dname, "forward_identical": fwd, "backward_exact": bwd})
    return rows


def check_no_sync(device: str) -> dict:
    """After a first call, a few-bit forward+backward on `device` makes no synchronizing CUDA call (no
    host-to-device copy of the table constants, no flag mask built per op): counted with torch's CUDA
    sync debug mode (a warning per synchronizing call), for the module, functional and gated forms."""
    if not device.startswith("cuda"):
        return {"checked": False, "why": "CUDA only"}
    import warnings

    mod = tightfit.nn.GELU(bits=3)
    t = tightfit.fewbit.get_table("silu", 2)

    def step() -> None:
        x = torch.randn(4096, device=device, requires_grad=True)
        b = torch.randn(4096, device=device, requires_grad=True)
        y = mod(x) + tightfit.functional.silu(x, bits=2) + tightfit.fewbit.swiglu(x, b, bits=3)
        y = y + tightfit.fewbit.gated.gated(x, b, "silu", table=t)
        y.backward(torch.ones_like(y))

    step()  # first call: the constants are copied to the device, the kernels compile
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    print(f"\nsynchronizing CUDA calls in a second few-bit forward+backward: {len(syncs)}")
    for m in syncs[:5]:
        print(f"  {m}")
    return {"checked": True, "syncs": len(syncs), "messages": syncs[:5]}


def check_other_gpu() -> dict:
    """With two or more GPUs: tensors on cuda:1 while cuda:0 is current go through the Triton kernels on
    cuda:1 (Triton launches on the current device: the op must make the tensor's device current) and give
    the reference codes and backward; cuda:1 gets its own availability probe."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return {"checked": False, "why": "needs two CUDA devices"}
    g = torch.Generator().manual_seed(1)
    borders = torch.sort(torch.randn(7, dtype=torch.float64, generator=g)).values
    levels = torch.randn(8, dtype=torch.float64, generator=g)
    ok = True
    with torch.cuda.device(0):
        for dtype in DTYPES.values():
            x, grad, b = (torch.randn(100_003, generator=g).to(dtype) for _ in range(3))
            want = codec._encode_torch(x, codec.compare_borders(borders, dtype), 3)
            got = codec.encode(x.to("cuda:1"), borders.to("cuda:1"), 3)
            ok &= got.device == torch.device("cuda:1") and torch.equal(got.cpu(), want)
            out = codec.decode_mul(want.to("cuda:1"), levels, grad.to("cuda:1"), 3, b.to("cuda:1"))
            ok &= torch.equal(out.cpu(), codec._decode_mul_torch(want, levels, grad, 3, b))
        backend = tightfit.fewbit.backend("cuda:1")
    print(f"\ncuda:1 tensors with cuda:0 current: backend {backend}, results equal the reference: {ok}")
    return {"checked": True, "backend": backend, "ok": bool(ok), "probed": sorted(codec._triton_cuda)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--lengths", type=int, nargs="*", default=[1, 7, 1_000_003])
    p.add_argument("--results", default="fewbit_cuda_check")
    a = p.parse_args()
    with results.Transcript() as transcript:
        data, ok = run(a)
    results.say_written(results.write(a.results, data, text=transcript.text, device=a.device))
    sys.exit(0 if ok else 1)


def run(a: argparse.Namespace) -> tuple[dict, bool]:
    backend = tightfit.fewbit.backend(a.device)
    print(f"command: {results.command_line()}\ndevice {results.device_name(a.device)}, torch "
          f"{torch.__version__}; few-bit backend for {a.device} tensors: {backend}")
    data: dict = {"backend": backend}
    fused = {}
    if backend == "triton":
        tri = codec._triton_module()
        import triton

        data["triton"] = triton.__version__
        print("\n| activation | dtype | forward |\n|---|---|---|")
        for name in tri.FUSED:
            for dname, dtype in DTYPES.items():
                ok = tri.fused_ok(name, dtype, torch.device(a.device))
                fused[f"{name}/{dname}"] = ok
                how = "fused (bit-identical to torch)" if ok else "torch's kernel, then one encoding pass"
                print(f"| {name} | {dname} | {how} |")
    data["fused"] = fused
    codec_rows = check_codec(a.device, a.lengths)
    op_rows = check_ops(a.device)
    bad = [r for r in codec_rows if not (r["codes"] and r["backward"] and r["gated_backward"])]
    bad += [r for r in op_rows if not (r["forward_identical"] and r["backward_exact"])]
    no_sync = check_no_sync(a.device)
    other_gpu = check_other_gpu() if a.device.startswith("cuda") else {"checked": False, "why": "CUDA only"}
    if no_sync.get("syncs"):
        bad.append({"check": "no_sync", **no_sync})
    if other_gpu.get("checked") and not other_gpu["ok"]:
        bad.append({"check": "other_gpu", **other_gpu})
    print(f"\ncodec checks: {len(codec_rows)} (bits 1..8 x fp32/bf16/fp16 x lengths {a.lengths} x layouts), "
          f"op checks: {len(op_rows)}; failures: {len(bad)}")
    for r in bad:
        print(f"FAILED: {r}")
    notes = tightfit.fewbit.backend_notes()
    for note in notes:
        print(f"note: {note}")
    data |= {"codec": codec_rows, "ops": op_rows, "no_sync": no_sync, "other_gpu": other_gpu,
             "failures": bad, "notes": notes}
    return data, not bad


if __name__ == "__main__":
    main()
