"""tightfit.plan on real data: the pretrained MiniLM-L6 fine-tuned on BBC News under a plan allowing few-bit.

Three runs with the same seeds, data order and head init (``benchmarks.data.realdata.finetune_minilm``):

  baseline                 the model as it is
  plan +fewbit @ B         tightfit.plan(allow=("recompute", "offload", "fewbit")) at budget B
  plan lossless @ B        tightfit.plan(allow=("recompute", "offload")) at the same budget B

B is the budget the few-bit planner resolves for ``--budget`` (default "x1.05": the least memory it predicts
within 1.05 times the unmodified step, a budget where few-bit pays), planned on the first training batch with
the AdamW optimizer of the run (its state counts). Reported: test accuracy (target: within 1 point of the
baseline), the ruler's peak of a training step (target: <= B), the median step time of each plan, and the
techniques each plan uses.

    python -m benchmarks.planner.realdata --threads 2                       # the full run (150 steps)
    python -m benchmarks.planner.realdata --steps 3 --max-len 32 --batch-size 4 --results planner_realdata_dry

Results: benchmarks/results/latest/<--results>.{json,txt}. Data: ``make data`` (see benchmarks/data).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import tightfit
from benchmarks.common import results
from benchmarks.data import realdata

LOSSLESS = ("recompute", "offload")
FEWBIT = ("recompute", "offload", "fewbit")


def first_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The first training batch of the run (the order ``finetune_minilm`` draws with the same seed)."""
    _, tokenizer = realdata.load_minilm(num_labels=5)
    train, _ = realdata.load_bbc_news(tokenizer, max_len=args.max_len, seed=args.seed)
    return train.batch(next(realdata._batches(len(train), args.batch_size, args.seed)))


def planned(allow: tuple[str, ...], budget: Any, batch: dict, args: argparse.Namespace, box: dict) -> Any:
    """``prepare_model`` for ``finetune_minilm``: plan the model on ``batch`` and apply the plan."""

    def prepare(model: torch.nn.Module) -> torch.nn.Module:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)  # its state counts in the budget
        t0 = time.perf_counter()
        # Block-level options: with keep-these-ops options a lossless plan keeps what the few-bit one
        # keeps on BertLayer (torch's GELU keeps only its input, a matmul output those options keep
        # anyway), so no budget needs few-bit; block-level options show its effect on a real fine-tune
        config = tightfit.RematConfig(op_level=False)
        planner = tightfit.planner.Planner(model, batch, allow=allow, optimizer=opt, config=config)
        b = planner.resolve_budget(box.get("budget", budget))
        box.setdefault("budget", b)
        plan = planner.plan(b)
        box[allow] = {
            "plan": str(plan),
            "planning_s": time.perf_counter() - t0,
            "techniques": plan.techniques,
        }
        print(plan, flush=True)
        return plan.apply_(model)

    return prepare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--budget", default="x1.05", help="a size, 'min' or 'xR' (resolved by the few-bit planner)"
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--results", default="planner_realdata_minilm")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with results.Transcript() as transcript:
        print(f"command: {results.command_line()}\ntorch {torch.__version__}, {a.threads} thread(s), CPU")
        try:
            batch = first_batch(a)
        except realdata.DataMissing as exc:
            print(f"DATA MISSING: {exc}")
            results.say_written(results.write(a.results, {"data_missing": str(exc)}, text=transcript.text))
            return
        box: dict[Any, Any] = {}
        runs: dict[str, Any] = {}

        def recipe(prepare: Any) -> dict[str, Any]:
            return realdata.finetune_minilm(
                prepare, steps=a.steps, batch_size=a.batch_size, max_len=a.max_len, lr=a.lr, seed=a.seed
            )

        for name, prepare in (
            ("plan +fewbit", planned(FEWBIT, a.budget, batch, a, box)),  # first: it resolves the budget
            ("plan lossless", planned(LOSSLESS, a.budget, batch, a, box)),
            ("baseline", None),
        ):
            print(f"running {name} ...", flush=True)
            t0 = time.time()
            runs[name] = recipe(prepare) | {"wall_s": round(time.time() - t0, 1)}
        base = runs["baseline"]
        budget = box["budget"]
        rows = []
        for name, r in runs.items():
            allow = FEWBIT if name == "plan +fewbit" else LOSSLESS if name == "plan lossless" else None
            rows.append(
                {
                    "variant": name,
                    "test_accuracy": r["test_accuracy"],
                    "delta_points": 100 * (r["test_accuracy"] - base["test_accuracy"]),
                    "peak_bytes": r["peak_bytes"],
                    "within_budget": None if allow is None else r["peak_bytes"] <= budget,
                    "step_time_median_s": r["step_time_median"],
                    "techniques": None if allow is None else list(box[allow]["techniques"]),
                    "planning_s": None if allow is None else round(box[allow]["planning_s"], 1),
                }
            )
        print(f"budget {tightfit.format_size(budget)} ({budget} bytes, from --budget {a.budget})")
        print("| variant | acc % | Δ pts | peak | <= budget | step (median) | techniques |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['variant']} | {100 * r['test_accuracy']:.2f} | {r['delta_points']:+.1f} | "
                f"{tightfit.format_size(r['peak_bytes'] or 0)} | {r['within_budget']} | "
                f"{(r['step_time_median_s'] or 0):.3f} s | {r['techniques']} |"
            )
        fewbit_row = rows[0]
        print(
            f"targets: accuracy within 1 point: {abs(fewbit_row['delta_points']) <= 1.0}; "
            f"peak <= budget: {fewbit_row['within_budget']}; "
            f"few-bit used: {'fewbit' in (fewbit_row['techniques'] or [])}"
        )
    data = {
        "settings": vars(a),
        "budget_bytes": budget,
        "rows": rows,
        "plans": {",".join(k): v["plan"] for k, v in box.items() if isinstance(k, tuple)},
        "runs": {
            k: {kk: vv for kk, vv in v.items() if kk != "losses"} | {"losses": v["losses"]}
            for k, v in runs.items()
        },
    }
    results.say_written(results.write(a.results, data, text=transcript.text))


if __name__ == "__main__":
    main()
