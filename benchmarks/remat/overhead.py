"""Per-call overhead of checkpointing an LSTM stepped over time, and what Python's garbage collector adds.

The zoo LSTM LM over T steps, in one process, three variants with the same segments of k time steps:
no remat, hand-written `checkpoint` over every k steps (the model's `rnn.run`), and tightfit's segments of
k steps (`tightfit.remat.execute.apply`, which pauses the collector during the training forward and a
segment's replay). Each is timed with the collector as the process has it (on) and switched off for the
whole step, interleaved over rounds; forward and backward medians and step ratios to no remat are printed.
A 4-wide LSTM is pure per-call overhead; a 256-wide one is the `benchmarks.remat.lstm` configuration.
On an accelerator each phase is timed to the device's completion, and "fw issued" is when the forward
returned to Python without waiting: a phase whose issue time is close to its completed time was bound by
the Python side (launches, hooks, recording), not by the device.

    python -m benchmarks.remat.overhead --hidden 4 --embed 4 --batch 1     # overhead-bound: ..._h4
    python -m benchmarks.remat.overhead --hidden 4 --embed 4 --batch 1 --segment 25   # ..._h4_seg25
    python -m benchmarks.remat.overhead                                    # H=256, B=8: ..._h256
    python -m benchmarks.remat.overhead --device cuda --hidden 4096 --embed 128 --batch 64 --segment 25 \\
        --results remat_overhead_h100                                       # on an H100

The plan is written in the saved-plan form (per module path, one option key per call: ``segment:<n>`` opens
a region over n block calls, ``in-segment`` is a later call in it).

Results: benchmarks/results/latest/<--results, default remat_overhead_h<H>[_seg<k>]>.{json,txt}.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time

import torch

from benchmarks.common import results
from benchmarks.common.timing import interleaved, wait_for_device
from benchmarks.remat.peers import segment_checkpoint

SEGMENT_KEY, IN_SEGMENT_KEY = "segment", "in-segment"  # option keys of a saved plan


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--embed", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--segment", type=int, default=32, help="time steps per checkpointed segment")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, ...")
    ap.add_argument("--results", default=None, help="name in results/latest/ (default: see above)")
    args = ap.parse_args(argv)
    with results.Transcript() as transcript:
        data = run(args)
    seg = f"_seg{args.segment}" if args.segment != 32 else ""
    name = args.results or f"remat_overhead_h{args.hidden}{seg}"
    results.say_written(results.write(name, data, device=args.device, text=transcript.text))


def run(args: argparse.Namespace) -> dict:
    """Time the three variants with the collector on and off; print and return the medians."""
    torch.set_num_threads(1)
    if args.device.startswith("cuda"):  # as benchmarks.remat.lstm runs it: gradients reproducible bit for bit
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)

    from tightfit.remat import execute
    from tightfit.zoo.lstm import LSTMConfig, LSTMLanguageModel

    torch.manual_seed(0)
    cfg = LSTMConfig(vocab_size=64, embed_dim=args.embed, hidden_size=args.hidden, dropout=0.1)
    plain = LSTMLanguageModel(cfg).to(args.device).train()
    ids = torch.randint(0, 64, (args.batch, args.steps), device=args.device)
    batch = {"x": ids, "labels": ids.clone()}
    hand = copy.deepcopy(plain)
    segment_checkpoint(hand, args.segment)
    tight = copy.deepcopy(plain)
    decisions: dict[str, list[str]] = {}
    paths = ["rnn.cells.0", "rnn.dropout", "rnn.cells.1", "rnn.dropout"]  # the block calls of one step
    calls: list[str] = []
    for start in range(0, args.steps, args.segment):
        n = 4 * min(args.segment, args.steps - start)
        calls += [f"{SEGMENT_KEY}:{n}"] + [IN_SEGMENT_KEY] * (n - 1)
    for k, option in enumerate(calls):
        decisions.setdefault(paths[k % 4], []).append(option)
    execute.apply(tight, decisions)

    variants = {
        "no remat": plain,
        f"checkpoint every {args.segment}": hand,
        f"tightfit {args.segment}": tight,
    }

    def step(item: tuple[str, bool]) -> tuple[float, float, float]:
        """(forward issued, forward done, backward done) seconds of one step of a variant."""
        name, collector_off = item
        model = variants[name]
        gc.collect()
        if collector_off:
            gc.disable()
        wait_for_device()
        t0 = time.perf_counter()
        loss = model(**batch)
        issued = time.perf_counter()
        wait_for_device()
        t1 = time.perf_counter()
        loss.backward()
        wait_for_device()
        t2 = time.perf_counter()
        gc.enable()
        for p in model.parameters():
            p.grad = None
        return issued - t0, t1 - t0, t2 - t1

    items = [(name, off) for name in variants for off in (False, True)]
    # one warm-up round, then interleaved rounds in the same order
    rounds = interleaved(items, step, args.rounds, warmup=1, order="fixed")
    times = dict(zip(items, rounds))
    med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in times.items()}
    print(
        f"LSTM 2 x {args.hidden}, embed {args.embed}, batch {args.batch}, T={args.steps}, segments of "
        f"{args.segment} steps on {args.device}; medians of {args.rounds} interleaved rounds, 1 thread"
    )
    print(
        f"{'variant':<24} {'collector':<10} {'fw issued s':>11} {'forward s':>10} {'backward s':>11} "
        f"{'step s':>8} {'ratio':>6}"
    )
    rows = []
    for off in (False, True):
        base = sum(med[("no remat", off)][1:])
        for name in variants:
            i, f, b = med[(name, off)]
            label = "off" if off else "on"
            total = f + b
            print(
                f"{name:<24} {label:<10} {i:>11.3f} {f:>10.3f} {b:>11.3f} {total:>8.3f} {total / base:>6.2f}"
            )
            rows.append(
                {
                    "variant": name,
                    "collector": label,
                    "forward_issued_s": i,
                    "forward_s": f,
                    "backward_s": b,
                    "step_s": total,
                    "ratio": total / base,
                    "rounds_s": [list(x) for x in times[(name, off)]],
                }
            )
    return {"settings": vars(args) | {"threads": 1}, "rows": rows}


if __name__ == "__main__":
    main()
