"""Convergence on real data: fine-tune pretrained MiniLM-L6 on BBC News with every linear layer randomized.

    python -m benchmarks.sketch.convergence                        # the full grid (slow on CPU)
    python -m benchmarks.sketch.convergence --steps 40 --max-len 32 --batch-size 8 --lr 1e-4 \\
        --results sketch_convergence_reduced                     # all 13 variants, minutes
    python -m benchmarks.sketch.convergence --steps 80 --max-len 64 \\
        --variants baseline gaussian@0.5 gaussian@0.2 rows@0.5 rows@0.2

Each variant starts from the same pretrained weights, head init and data order (benchmarks/data/realdata.py,
`finetune_minilm`). A variant named SKETCH@RATIO converts every nn.Linear of the model (attention, MLP,
pooler, classifier) with `tightfit.convert_(model, tightfit.Sketch(ratio=RATIO, sketch=SKETCH))`.
The table shows test accuracy, the mean training loss over the last 10 steps, the exact live-tensor
peak of one training step (tightfit.memory.LiveTracker: params, grads, AdamW state, batch and
activations), and the median step time. All numbers come from this process, next to the baseline.

Results: benchmarks/results/latest/<--results>.{json,txt}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import results
from benchmarks.data.realdata import DataMissing, finetune_minilm
from tightfit.sizes import format_size
from tightfit.sketch.config import Sketch
from tightfit.sketch.sketches import SKETCHES

DEFAULT_VARIANTS = ["baseline"] + [f"{s}@{r}" for s in SKETCHES for r in (0.5, 0.2, 0.1)]


def _prepare(variant: str, keep: list):  # noqa: ANN202
    config = None
    if variant != "baseline":
        sketch, _, ratio = variant.partition("@")
        config = Sketch(ratio=float(ratio), sketch=sketch)

    def prepare(model: torch.nn.Module) -> None:
        import tightfit

        if config is not None:
            tightfit.convert_(model, config, verbose=False)
        keep.append(model)

    return prepare


def _activation_memory(model: torch.nn.Module, batch_size: int, max_len: int) -> tuple[int, int]:
    """(bytes saved for backward, live-tensor peak of forward+backward beyond params) on one synthetic batch
    of the training shape: the AdamW state dominates the training-step peak, this isolates activations."""
    from tightfit.memory import LiveTracker, SavedTensorCounter

    gen = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (batch_size, max_len), generator=gen),
        "attention_mask": torch.ones(batch_size, max_len, dtype=torch.long),
        "labels": torch.randint(0, 5, (batch_size,), generator=gen),
    }
    model.train()
    with SavedTensorCounter(exclude=[model, batch]) as counter:
        loss = model(**batch).loss
    del loss
    for p in model.parameters():
        p.grad = None
    with LiveTracker(track=[model, batch]) as tracker:
        model(**batch).loss.backward()
    peak = tracker.peak - tracker.baseline
    for p in model.parameters():
        p.grad = None
    return counter.bytes, peak


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="baseline and/or SKETCH@RATIO")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--results", default="sketch_convergence", help="name of the files in results/latest/")
    args = ap.parse_args(argv)
    for v in args.variants:
        if v != "baseline":
            sketch, _, ratio = v.partition("@")
            Sketch(ratio=float(ratio), sketch=sketch)  # validate every variant before the long runs
    if args.threads:
        torch.set_num_threads(args.threads)

    with results.Transcript() as transcript:
        rows, missing = _run(args)
    data = {
        "settings": vars(args) | {"threads": torch.get_num_threads()},
        "task": "MiniLM-L6 fine-tune on BBC News, every nn.Linear converted",
        "variants": [dict(zip(ROW_KEYS, r)) for r in rows],
    }
    if missing:
        data["data_missing"] = missing
    results.say_written(results.write(args.results, data, text=transcript.text))


ROW_KEYS = (
    "variant",
    "test_accuracy",
    "loss_last10",
    "step_peak_bytes",
    "step_time_median_s",
    "saved_activation_bytes",
    "activation_peak_bytes",
)


def _run(args: argparse.Namespace) -> tuple[list[tuple], str | None]:
    """Train every variant, print the table; (rows, the missing-data message or None)."""
    rows: list[tuple] = []
    for variant in args.variants:
        t0 = time.perf_counter()
        keep: list = []
        try:
            res = finetune_minilm(
                _prepare(variant, keep), steps=args.steps, batch_size=args.batch_size, max_len=args.max_len,
                lr=args.lr, seed=args.seed,
            )
        except DataMissing as exc:
            print(f"DATA MISSING: {exc}", flush=True)
            return rows, str(exc)
        wall = time.perf_counter() - t0
        saved, act_peak = _activation_memory(keep[0], args.batch_size, args.max_len)
        last = statistics.fmean(res["losses"][-10:])
        rows.append((variant, res["test_accuracy"], last, res["peak_bytes"], res["step_time_median"], saved,
                     act_peak))
        print(f"[done] {variant}: acc {res['test_accuracy']:.4f}, loss(last 10) {last:.4f}, "
              f"peak {res['peak_bytes']}, saved {saved}, act peak {act_peak}, "
              f"step {res['step_time_median']}, wall {wall:.0f}s", flush=True)

    print(f"\n$ {results.command_line()}")
    print(
        f"MiniLM-L6 on BBC News: {args.steps} steps, batch {args.batch_size}, max_len {args.max_len}, AdamW "
        f"lr {args.lr}, seed {args.seed}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        "CPU (shared machine: times are noisy)"
    )
    base = next((r for r in rows if r[0] == "baseline"), None)

    def rel(value: float | None, i: int) -> str:
        return f"{value / base[i]:.3f}" if base and value and base[i] else "-"

    print(
        f"{'variant':<15} {'test acc':>8} {'loss(last10)':>12} {'step peak':>10} {'vs base':>7} "
        f"{'saved act':>10} {'vs base':>7} {'act peak':>10} {'vs base':>7} {'step':>7} {'vs base':>7}"
    )
    for variant, acc, loss, peak, step, saved, act in rows:
        peak_s = format_size(peak) if peak is not None else "-"
        step_s = f"{step:.2f}s" if step is not None else "-"
        print(
            f"{variant:<15} {acc:>8.4f} {loss:>12.4f} {peak_s:>10} {rel(peak, 3):>7} "
            f"{format_size(saved):>10} {rel(saved, 5):>7} {format_size(act):>10} {rel(act, 6):>7} "
            f"{step_s:>7} {rel(step, 4):>7}"
        )
    print(
        "step peak: live-tensor peak of a whole training step (params, grads, AdamW state, batch, "
        "activations); saved act: bytes kept for backward on one batch of the training shape; act peak: "
        "live-tensor peak of forward+backward on that batch beyond params and batch (tightfit.memory)"
    )
    return rows, None


if __name__ == "__main__":
    main()
