"""tightfit.plan with offload on CUDA: the device run owed to the planner issue (GPT-2-medium-sized).

On one GPU, for budgets between the smallest feasible and the unmodified peak, in one process:
``tightfit.plan`` recompute only, recompute + offload, and recompute + offload + few-bit, each planned
once per allow set (one ``Planner``) and applied to its own copy of the model. Per variant: the ruler's
device peak (``peak_by_device``), CUDA's allocator peak, host bytes, median step time over interleaved
rounds and gradients against the unmodified model (torch.equal for lossless plans).

    python -m benchmarks.planner.cuda_offload                               # on a GPU (~5 min)
    python -m benchmarks.planner.cuda_offload --device cpu --model gpt2-tiny --batch 2 --seq 32 \\
        --rounds 1 --results planner_cuda_offload_dry      # CPU dry run: offload through SimulatedTarget

Results: benchmarks/results/latest/<--results>.json (default planner_cuda_offload_<model>).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch

from benchmarks.common import results
from benchmarks.common.steps import grads
from benchmarks.common.timing import interleaved, timed
from tightfit import zoo
from tightfit.memory import LiveTracker, allocator_peak
from tightfit.planner import Plan, Planner
from tightfit.planner.variants import grad_sqnr
from tightfit.remat import RematConfig
from tightfit.sizes import format_size

ALLOWS = {
    "recompute": ("recompute",),
    "recompute+offload": ("recompute", "offload"),
    "recompute+offload+fewbit": ("recompute", "offload", "fewbit"),
}


def step_fn(model: torch.nn.Module, batch: dict) -> Any:
    def step() -> None:
        for p in model.parameters():
            p.grad = None
        loss = model(**batch).loss  # the output is freed before the backward (planned: keep_output=False)
        loss.backward()

    return step


def device_peak(model: torch.nn.Module, batch: dict, device: str) -> tuple[int, dict[str, int]]:
    step = step_fn(model, batch)
    with LiveTracker(track=[model, batch]) as t:
        step()
    key = f"{torch.device(device).type}:{torch.device(device).index or 0}" if device != "cpu" else "cpu"
    return t.peak_by_device.get(key, t.peak), dict(t.peak_by_device)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-medium")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--budgets", type=int, default=3, help="budgets between the smallest and the unmodified")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    simulated = args.device == "cpu"
    target = None
    if simulated:
        from tightfit.offload import SimulatedTarget

        target = SimulatedTarget()
    model_f, batch_f = zoo.get(args.model)
    torch.manual_seed(0)
    model = model_f().train().to(args.device)
    batch = {
        k: v.to(args.device) if isinstance(v, torch.Tensor) else v
        for k, v in batch_f(batch_size=args.batch, seq_len=args.seq).items()
    }
    batch["use_cache"] = False
    torch.manual_seed(1)
    step_fn(model, batch)()
    reference = grads(list(model.parameters()))
    config = RematConfig(keep_output=False)
    planners: dict[str, Planner] = {}
    for name, allow in ALLOWS.items():
        t0 = time.perf_counter()
        planners[name] = Planner(
            copy.deepcopy(model), batch, allow=allow, config=config, offload_target=target
        )
        print(f"{name}: measured in {time.perf_counter() - t0:.1f}s; notes: {planners[name].notes[-2:]}")
    lo = max(p.min_budget for p in planners.values())
    hi = planners["recompute"].baseline_peak
    budgets = [int(lo + (hi - lo) * i / max(1, args.budgets - 1)) for i in range(args.budgets)]
    rows: list[dict[str, Any]] = []
    runs: list[Any] = []
    for b in budgets:
        for name, planner in planners.items():
            plan: Plan = planner.plan(b)
            m = copy.deepcopy(model)
            plan.apply_(m, offload_target=target)
            peak, by_device = device_peak(m, batch, args.device)
            torch.manual_seed(1)
            step_fn(m, batch)()
            got = [p.grad for p in m.parameters()]
            sqnr = grad_sqnr(reference, got)
            allocator = None
            if torch.cuda.is_available() and not simulated:
                allocator = allocator_peak(step_fn(m, batch), args.device)
            rows.append(
                {
                    "budget": b,
                    "allow": name,
                    "techniques": list(plan.techniques),
                    "summary": plan.summary(),
                    "device_peak": peak,
                    "peak_by_device": by_device,
                    "allocator_peak_above_start": allocator,
                    "within_budget": peak <= b,
                    "grad_sqnr_db": sqnr,
                    "plan_measured_time_s": plan.measured_time,
                }
            )
            runs.append(step_fn(m, batch))
            print(
                f"{format_size(b)} {name}: device peak {format_size(peak)}, {plan.summary()}, SQNR {sqnr:.1f}"
            )
    times = interleaved(runs, timed, args.rounds, warmup=1, order="rotate")
    for row, ts in zip(rows, times):
        row["median_s"] = statistics.median(ts)
        where = f"{format_size(row['budget'])} {row['allow']}"
        print(f"{where}: {row['median_s'] * 1e3:.1f} ms, {row['techniques']}")
    stem = args.results or f"planner_cuda_offload_{args.model}"
    results.say_written(
        results.write(stem, {"args": vars(args), "simulated": simulated, "rows": rows}, device=args.device)
    )


if __name__ == "__main__":
    main()
