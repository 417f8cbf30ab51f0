"""Estimate a training step of a model larger than this machine, without allocating (FakeTensorMode).

    python -m benchmarks.memory.estimate [--model gpt2-xl] [--batch 8] [--seq 1024] [--check-small]

Prints parameters, optimizer state, activations, peak and FLOPs beside 6·N·tokens, the wall and CPU time
of the estimate and the process's peak RSS (the issue's targets: < 15 s and < 1 GiB for gpt2-xl, B=8,
T=1024). RSS is reported here only to show that nothing was allocated; tightfit never measures memory
with it. Optionally (--check-small) it compares estimate with a real profile on the tiny variant.

Results: benchmarks/results/latest/<--results, default estimate>.{json,txt}.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import tightfit
from benchmarks.common import results
from tightfit.sizes import format_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-xl")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--check-small", action="store_true", help="also compare with profile on -tiny")
    parser.add_argument("--results", default="estimate", help="name of the files in results/latest/")
    args = parser.parse_args()
    with results.Transcript() as transcript:
        data = run(args)
    results.say_written(results.write(args.results, data, text=transcript.text))


def run(args: argparse.Namespace) -> dict:
    """Estimate, print, and return the numbers."""

    model_factory, batch_factory = tightfit.zoo.get(args.model)
    # foreach=True: one optimizer op per step instead of one per parameter; same state, faster to trace.
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    report = tightfit.estimate(
        model_factory,
        lambda: batch_factory(batch_size=args.batch, seq_len=args.seq),
        optimizer_factory=lambda params: torch.optim.AdamW(params, foreach=True),
    )
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    n_params = report.params_bytes // 4
    tokens = args.batch * args.seq
    print(report)
    print()
    print(f"model {args.model}, batch {args.batch}, seq {args.seq}, AdamW, fp32, train mode (dropout on)")
    print(f"parameters       {n_params / 1e9:.3f} B ({format_size(report.params_bytes)})")
    print(f"optimizer state  {format_size(report.optimizer_bytes)}")
    print(f"activations      {format_size(report.activations_bytes)}")
    print(f"peak             {format_size(report.peak_bytes)} ({report.peak_phase}, {report.peak_op})")
    six_n_t = 6 * n_params * tokens
    print(
        f"FLOPs counted    {report.flops / 1e12:.1f} TFLOP   6·N·tokens {six_n_t / 1e12:.1f} TFLOP   "
        f"ratio {report.flops / six_n_t:.3f}"
    )
    print(f"estimate took    {wall:.1f} s wall, {cpu:.1f} s CPU   (target < 15 s)")
    print(f"process max RSS  {format_size(rss)}   (target < 1 GiB)")
    out = {
        "settings": vars(args) | {"optimizer": "AdamW(foreach=True)", "dtype": "float32", "mode": "train"},
        "estimate": {
            "params": n_params,
            "params_bytes": report.params_bytes,
            "optimizer_bytes": report.optimizer_bytes,
            "activations_bytes": report.activations_bytes,
            "peak_bytes": report.peak_bytes,
            "peak_phase": str(report.peak_phase),
            "peak_op": str(report.peak_op),
            "flops": report.flops,
            "six_n_tokens_flops": six_n_t,
            "flops_ratio": report.flops / six_n_t,
            "wall_s": wall,
            "cpu_s": cpu,
            "max_rss_bytes": rss,
        },
        "report": str(report),
    }

    if args.check_small:
        small_model, small_batch = tightfit.zoo.get(f"{args.model}-tiny")
        fake = tightfit.estimate(small_model, small_batch, optimizer_factory=torch.optim.AdamW)
        model = small_model()
        real = tightfit.profile(model, small_batch(), optimizer=torch.optim.AdamW(model.parameters()))
        print(
            f"tiny check: saved {real.activations_bytes} vs {fake.activations_bytes} B, "
            f"peak {real.peak_bytes} vs {fake.peak_bytes} B (profile vs estimate)"
        )
        out["check_small"] = {
            "model": f"{args.model}-tiny",
            "profile": {"activations_bytes": real.activations_bytes, "peak_bytes": real.peak_bytes},
            "estimate": {"activations_bytes": fake.activations_bytes, "peak_bytes": fake.peak_bytes},
        }
    return out


if __name__ == "__main__":
    main()
