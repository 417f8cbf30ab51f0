"""Does a change to tightfit's remat code change its plans? The same GPT-2 plans by two versions of tightfit.

The published GPT-2 table (``remat_gpt2_b8t256``) plans with measured clock times, so two runs of the same
code can choose other plans when the machine's load moves a block's timing. This script removes that noise:
both versions measure the zoo GPT-2 (B=8, T=256, dropout on, output freed after the loss, as the table's
harness runs it) with FLOP-counted times (``RematConfig(flop_rate=...)``: deterministic), plan every eager
tightfit budget of the published table, and record each plan's decisions (JSON keys), predicted peak and
measured peak (bytes, the ruler on the real step). The other version is a git commit, checked out into a
temporary worktree and run in a child process with its ``src`` first on the path.

    python -m benchmarks.remat.same_plans --against 88bd550     # about 5 minutes on one core

Results: benchmarks/results/latest/remat_gpt2_same_plans.json (both versions, and whether they agree).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import results

PUBLISHED = results.LATEST / "remat_gpt2_b8t256.json"


def eager_budgets(path: Path) -> list[int]:
    """The eager tightfit budgets of a GPT-2 results file (bytes)."""
    rows = json.loads(path.read_text())["rows"]
    return [int(r["budget"]) for r in rows if r["family"] == "tightfit" and not r["compiled"]]


def plans(budgets: list[int], flop_rate: float) -> dict[str, Any]:
    """Plans of the imported tightfit for ``budgets`` (the planner measured once, FLOP-counted times)."""
    # the workload of ``benchmarks.remat.workload.gpt2_workload``, built from tightfit alone: the other
    # version runs this function with its own tightfit, which the benchmark harness may not import
    import tightfit

    model_factory, batch_factory = tightfit.zoo.get("gpt2-small-cpu")
    torch.manual_seed(0)
    model = model_factory().train()
    batch = {**batch_factory(batch_size=8, seq_len=256), "use_cache": False}
    try:
        from tightfit.remat import RematConfig  # typed configuration
    except ImportError:  # string options and keyword arguments
        planner = tightfit.remat.Planner(model, batch, keep_output=False, flop_rate=flop_rate)
    else:
        planner = tightfit.remat.Planner(
            model, batch, config=RematConfig(keep_output=False, flop_rate=flop_rate)
        )
    out = []
    for budget in budgets:
        plan = planner.plan(budget)
        decisions = [str(d.option) for d in plan.decisions]
        out.append(
            {"budget": budget, "decisions": decisions, "peak": plan.peak, "measured_peak": plan.measured_peak}
        )
    return {
        "tightfit_file": tightfit.__file__,
        "min_budget": int(planner.min_budget),
        "baseline_peak": int(planner.baseline_peak),
        "plans": out,
    }


def other_version(commit: str, budgets: list[int], flop_rate: float) -> dict[str, Any]:
    """``plans`` by tightfit at ``commit`` (a temporary git worktree, a child process)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(tree), commit], cwd=results.REPO, check=True
        )
        try:
            code = (
                f"import sys, json; sys.path.insert(0, {str(tree / 'src')!r}); "
                f"sys.path.insert(1, {str(results.REPO)!r}); "
                "import torch; torch.set_num_threads(1); "
                "from benchmarks.remat.same_plans import plans; "
                f"print(json.dumps(plans({budgets!r}, {flop_rate!r})))"
            )
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"tightfit at {commit} failed to plan:\n{done.stderr[-3000:]}")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=results.REPO, check=True)
    data = json.loads(done.stdout.strip().splitlines()[-1])
    if not data["tightfit_file"].startswith(str(tree)):
        raise RuntimeError(f"the child imported {data['tightfit_file']}, not the worktree's tightfit")
    return {"commit": results.git("rev-parse", commit), **data}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the git commit to compare with (e.g. 88bd550)")
    parser.add_argument(
        "--budgets-from", type=Path, default=PUBLISHED, help="GPT-2 results whose budgets to plan"
    )
    parser.add_argument("--flop-rate", type=float, default=1e12, help="FLOP/s of the counted times")
    args = parser.parse_args()
    torch.set_num_threads(1)
    budgets = eager_budgets(args.budgets_from)
    print(f"planning {len(budgets)} budgets with tightfit at {args.against} ...", flush=True)
    other = other_version(args.against, budgets, args.flop_rate)
    print("planning them with this checkout ...", flush=True)
    this = plans(budgets, args.flop_rate)
    rows = []
    for a, b in zip(other["plans"], this["plans"]):
        same = a["decisions"] == b["decisions"] and a["measured_peak"] == b["measured_peak"]
        rows.append(
            {"budget": a["budget"], "same_decisions_and_peak": same, "measured_peak": b["measured_peak"]}
        )
        print(
            f"  budget {a['budget']:>11,} B: peak {a['measured_peak']:>11,} B at {args.against[:7]}, "
            f"{b['measured_peak']:>11,} B here: {'same plan' if same else 'DIFFERENT'}"
        )
    identical = all(r["same_decisions_and_peak"] for r in rows) and other["min_budget"] == this["min_budget"]
    print(
        f"identical: {identical} (smallest feasible budget {other['min_budget']:,} B at {args.against[:7]}, "
        f"{this['min_budget']:,} B here)"
    )
    settings = {"workload": "zoo gpt2-small-cpu, B=8, T=256, dropout 0.1, keep_output=False", **vars(args)}
    settings["budgets_from"] = str(args.budgets_from)
    paths = results.write(
        "remat_gpt2_same_plans",
        {"settings": settings, "identical": identical, "rows": rows, "against": other, "this": this},
    )
    results.say_written(paths)


if __name__ == "__main__":
    main()
