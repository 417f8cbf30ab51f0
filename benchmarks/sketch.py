"""RandomizedLinear vs nn.Linear on one transformer-sized layer: saved bytes, peak memory, fwd+bwd time.

    .venv/bin/python benchmarks/sketch.py                      # N=4096 tokens, 768 -> 3072, fp32
    .venv/bin/python benchmarks/sketch.py --repeats 9 --sketches rows gaussian --ratios 0.5 0.2 0.1

Every variant shares the same weights, input and output gradient. Saved bytes come from
tightfit.memory.SavedTensorCounter (input activation counted, parameters excluded). Peak is the exact
live-tensor peak of one forward+backward (tightfit.memory.LiveTracker, parameters and input included).
Times are interleaved across variants (shuffled order each round) and reported as medians, each with the
ratio to nn.Linear from the same process.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch
from torch import nn

from tightfit.memory import LiveTracker, SavedTensorCounter
from tightfit.sizes import format_size
from tightfit.sketch.modules import RandomizedLinear
from tightfit.sketch.sketches import SKETCHES


def _step(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    y = module(x)
    y.backward(g)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--d-out", type=int, default=3072)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.2, 0.1])
    ap.add_argument("--sketches", nargs="+", default=list(SKETCHES), choices=SKETCHES)
    ap.add_argument("--repeats", type=int, default=7)
    # 1 thread by default: on a loaded shared machine OpenMP threads spin-wait on each other in small ops
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    base = nn.Linear(args.d_in, args.d_out, dtype=dtype)
    variants: dict[str, tuple[str, float | None, nn.Module]] = {"nn.Linear": ("nn.Linear", None, base)}
    for sketch in args.sketches:
        for ratio in args.ratios:
            rl = RandomizedLinear.from_linear(base, ratio=ratio, sketch=sketch)
            variants[f"{sketch}@{ratio}"] = (sketch, ratio, rl)
    x = torch.randn(args.tokens, args.d_in, dtype=dtype, requires_grad=True)
    g = torch.randn(args.tokens, args.d_out, dtype=dtype)

    saved: dict[str, int] = {}
    peak: dict[str, int] = {}
    kept: dict[str, int] = {}
    for name, (_, _, module) in variants.items():
        with SavedTensorCounter(exclude=[module]) as counter:
            y = module(x)
        saved[name] = counter.bytes
        del y
        base.weight.grad = base.bias.grad = x.grad = None
        with LiveTracker(track=[module, x, g]) as tracker:
            h = x * 1.0  # the layer input as an activation: freed after forward unless kept for backward
            y = module(h)
            del h
            kept[name] = tracker.current - tracker.baseline
            y.backward(g)
            del y
        peak[name] = tracker.peak
        base.weight.grad = base.bias.grad = x.grad = None

    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for name in names:  # warm-up
        _step(variants[name][2], x, g)
    rng = random.Random(0)
    for _ in range(args.repeats):
        rng.shuffle(names)
        for name in names:
            base.weight.grad = base.bias.grad = x.grad = None
            t0 = time.perf_counter()
            _step(variants[name][2], x, g)
            times[name].append(time.perf_counter() - t0)

    print(f"$ {' '.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    print(
        f"layer {args.d_in} -> {args.d_out}, N = {args.tokens} tokens, {args.dtype}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, {args.repeats} interleaved "
        "repeats (median); shared machine, timings are noisy"
    )
    ref_t = statistics.median(times["nn.Linear"])
    header = (
        f"{'variant':<16} {'saved':>10} {'ratio':>6} {'live after fwd':>14} {'ratio':>6} {'peak':>10} "
        f"{'ratio':>6} {'fwd+bwd':>9} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for name in variants:
        t = statistics.median(times[name])
        print(
            f"{name:<16} {format_size(saved[name]):>10} {saved[name] / saved['nn.Linear']:>5.3f}x "
            f"{format_size(kept[name]):>14} {kept[name] / kept['nn.Linear']:>5.3f}x "
            f"{format_size(peak[name]):>10} {peak[name] / peak['nn.Linear']:>5.3f}x "
            f"{1e3 * t:>7.1f}ms {t / ref_t:>5.2f}x"
        )
    print(
        "saved: bytes kept for backward (input activation counted, parameters excluded); live after fwd: "
        "bytes alive after the forward beyond the parameters, input leaf and output gradient (saved "
        "activations plus the output); peak: live-tensor peak of forward+backward, parameters, input leaf "
        "and output gradient included"
    )


if __name__ == "__main__":
    main()
