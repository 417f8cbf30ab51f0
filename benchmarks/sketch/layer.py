"""RandomizedLinear vs nn.Linear on one transformer-sized layer: saved bytes, peak memory, fwd+bwd time.

    python -m benchmarks.sketch.layer --repeats 5          # N=4096 tokens, 768 -> 3072, fp32, 1 thread
    python -m benchmarks.sketch.layer --repeats 9 --sketches rows gaussian --ratios 0.5 0.2 0.1

Every variant shares the same weights, input and output gradient. Saved bytes come from
tightfit.memory.SavedTensorCounter (input activation counted, parameters excluded). Peak is the exact
live-tensor peak of one forward+backward (tightfit.memory.LiveTracker, parameters and input included).
Times are interleaved across variants (shuffled order each round) and reported as medians, each with the
ratio to nn.Linear from the same process.

Results: benchmarks/results/latest/<--results, default sketch_layer>.{json,txt}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from benchmarks.common import results
from benchmarks.common.timing import interleaved
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
    ap.add_argument("--results", default="sketch_layer", help="name of the files in results/latest/")
    args = ap.parse_args(argv)
    with results.Transcript() as transcript:
        rows = run(args)
    data = {"settings": vars(args) | {"threads": torch.get_num_threads()}, "rows": rows}
    results.say_written(results.write(args.results, data, text=transcript.text))


def run(args: argparse.Namespace) -> list[dict]:
    """Measure every variant and print the table; return its rows."""
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

    names = list(variants)
    for name in names:  # warm-up
        _step(variants[name][2], x, g)

    def timed_step(name: str) -> float:
        base.weight.grad = base.bias.grad = x.grad = None
        t0 = time.perf_counter()
        _step(variants[name][2], x, g)
        return time.perf_counter() - t0

    # a shuffled order each round (random.Random(0))
    times = dict(zip(names, interleaved(names, timed_step, args.repeats, order="shuffle", seed=0)))

    print(f"$ {results.command_line()}")
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
    rows = []
    for name in variants:
        t = statistics.median(times[name])
        sketch, ratio, _ = variants[name]
        rows.append(
            {
                "variant": name,
                "sketch": sketch,
                "ratio": ratio,
                "saved_bytes": saved[name],
                "saved_vs_linear": saved[name] / saved["nn.Linear"],
                "live_after_forward_bytes": kept[name],
                "live_after_forward_vs_linear": kept[name] / kept["nn.Linear"],
                "peak_bytes": peak[name],
                "peak_vs_linear": peak[name] / peak["nn.Linear"],
                "fwd_bwd_ms": 1e3 * t,
                "time_vs_linear": t / ref_t,
                "times_s": times[name],
            }
        )
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
    return rows


if __name__ == "__main__":
    main()
