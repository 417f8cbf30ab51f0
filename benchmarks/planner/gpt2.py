"""tightfit.plan against single techniques and PyTorch's checkpointing on the zoo GPT-2, at the same budgets.

The zoo gpt2-small-cpu (12 layers, d=256, 4 heads, vocab 4096, dropout 0.1, train mode), B=8, T=256,
eager, CPU. Every variant is a deep copy of the same model, in ONE process:

  PyTorch (no technique) | checkpoint every k-th block | checkpoint_sequential(segments) |
  few-bit everywhere (FewBit(bits=2), no recompute) |
  per budget: rematerialize | few-bit everywhere + rematerialize by hand |
              tightfit.plan lossless (default allow) | tightfit.plan with few-bit allowed

Budgets: the smallest feasible (lossless), the peers' measured peaks, params + 280 MiB and params + 450 MiB
(the few-bit targets), and evenly spaced points. Each planner measures the model once (one ``Planner``) and
plans every budget; a plan is applied to its own copy. Per variant: the ruler's exact peak (the step frees
the output once the loss is computed; planners plan the same step: ``keep_output=False``), the median step
time over interleaved rounds (ratio to PyTorch in the same rounds), and gradients (torch.equal to the
unmodified model, dropout on; lossy variants get their SQNR).

Targets (issue "one budget"): at every budget, the one-knob plan is no slower than the best single
technique at equal or lower measured peak (paired rounds); with few-bit allowed, <= 280 MiB above
parameters at <= x1.10 and <= 450 MiB at <= x1.03; planning < 60 s with all techniques.

    python -m benchmarks.planner.gpt2                            # the published configuration
    python -m benchmarks.planner.gpt2 --batch 2 --seq 64 --layers 4 --rounds 2 --extra-budgets 0 \\
        --results planner_gpt2_dry                               # a dry run (TIGHTFIT_BENCH_RESULTS=...)

Results: benchmarks/results/latest/<--results>.{json,csv,png} (default planner_gpt2_b<B>t<T>).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

import tightfit
from benchmarks.common import results
from benchmarks.common.steps import MiB, fresh_copy, grads, reference_grads, run_step, tensors_of
from benchmarks.common.timing import paired_summary
from benchmarks.remat.harness import Variant, meta_conditions, print_table, time_interleaved, write_results
from benchmarks.remat.peers import chain_blocks, install_sequential, per_block_checkpoint
from benchmarks.remat.workload import Workload, finish, log
from tightfit import zoo
from tightfit.planner import Plan, Planner
from tightfit.planner.variants import grad_sqnr
from tightfit.remat import RematConfig, execute
from tightfit.sizes import format_size

SINGLE = ("ckpt-every-k", "ckpt-seq", "fewbit", "remat")  # single techniques (the targets' comparison)
ONE_KNOB = ("plan", "plan+fewbit")


def workload(batch: int, seq: int, layers: int | None) -> Workload:
    model_f, batch_f = zoo.get("gpt2-small-cpu")
    torch.manual_seed(0)
    model = (model_f(n_layer=layers) if layers else model_f()).train()
    b = dict(batch_f(batch_size=batch, seq_len=seq))
    b["use_cache"] = False
    n = len(model.transformer.h)
    desc = f"tightfit.zoo gpt2-small-cpu ({n} layers), B={batch}, T={seq}, dropout 0.1"
    return Workload("gpt2", model, b, ["transformer.h"], desc=desc, extra={"tag": f"b{batch}t{seq}"})


def variant(
    w: Workload, name: str, family: str, model: torch.nn.Module, params, bufs, budget=None
) -> Variant:
    v = Variant(
        name,
        family,
        run_step(model, w.batch, w.loss_fn),
        params,
        tensors_of(model) + tensors_of(w.batch),
        budget,
        buffers=bufs,
    )
    plan = getattr(model, "plan", None)
    if plan is not None:
        v.plan_text = str(plan)
        v.predicted_peak, v.predicted_time = int(plan.peak), float(plan.time)
        v.note = f"planner measured {format_size(plan.measured_peak or 0)}"
    return v


def sqnr_of(v: Variant, ref: Any, seed: int) -> float:
    torch.manual_seed(seed)
    v.step()
    return grad_sqnr(ref.grads, grads(v.params))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=None, help="layers (default: the zoo model's 12)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    ap.add_argument("--extra-budgets", type=int, default=2, help="evenly spaced budgets besides the others")
    ap.add_argument("--ckpt-every", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--segments", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--results", default=None, help="results name (default planner_gpt2_b<B>t<T>)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed = 0
    w = workload(args.batch, args.seq, args.layers)
    log(f"== {w.desc}")
    ref_model, ref_params, ref_bufs = fresh_copy(w.model)
    ref = reference_grads(run_step(ref_model, w.batch), ref_params, seed, ref_bufs)
    params_bytes = sum(p.numel() * p.element_size() for p in ref_params)
    del ref_model

    rows: list[Variant] = []
    m, p, bf = fresh_copy(w.model)
    rows.append(variant(w, "PyTorch", "baseline", m, p, bf))
    for k in args.ckpt_every:
        m, p, bf = fresh_copy(w.model)
        per_block_checkpoint(chain_blocks(m, w.chain_paths), k)
        rows.append(
            variant(w, "ckpt every block" if k == 1 else f"ckpt every {k}th", "ckpt-every-k", m, p, bf)
        )
    for s in args.segments:
        m, p, bf = fresh_copy(w.model)
        install_sequential(m, w.chain_paths, s)
        rows.append(variant(w, f"ckpt_sequential seg={s}", "ckpt-seq", m, p, bf))
    m, p, bf = fresh_copy(w.model)
    tightfit.convert_(m, tightfit.FewBit(bits=2))
    rows.append(variant(w, "few-bit everywhere", "fewbit", m, p, bf))
    for v in rows:
        finish(v, ref, seed)

    config = RematConfig(keep_output=False)
    planners: dict[str, Any] = {}
    setup: dict[str, float] = {}
    for name, allow in (
        ("plan", ("recompute", "offload")),
        ("plan+fewbit", ("recompute", "offload", "fewbit")),
    ):
        t0 = time.perf_counter()
        planners[name] = Planner(fresh_copy(w.model)[0], w.batch, allow=allow, config=config)
        setup[name] = time.perf_counter() - t0
        log(f"{name}: measured the model in {setup[name]:.1f}s ({planners[name].candidates} block options)")
    planners["remat"] = planners["plan"].remat  # rematerialize's own planner: the same measurement
    setup["remat"] = planners["plan"].remat.measure_time
    by_hand = fresh_copy(w.model)[0]
    tightfit.convert_(by_hand, tightfit.FewBit(bits=2))
    t0 = time.perf_counter()
    planners["fewbit+remat"] = tightfit.remat.Planner(by_hand, w.batch, config=config)
    setup["fewbit+remat"] = time.perf_counter() - t0

    base = rows[0]
    lo = planners["plan"].min_budget
    peers = [v.peak for v in rows[1:] if v.peak >= lo]
    targets = [params_bytes + 280 * MiB, params_bytes + 450 * MiB]
    spaced = [
        int(lo + (base.peak - lo) * (i + 1) / (args.extra_budgets + 1)) for i in range(args.extra_budgets)
    ]
    budgets: list[int] = []
    for b in sorted({lo, *peers, *[t for t in targets if lo <= t < base.peak], *spaced}):
        if not budgets or b > budgets[-1] * 1.02:
            budgets.append(b)
    log(f"budgets (MiB): {[round(b / MiB, 1) for b in budgets]}")
    plan_times: dict[str, list[float]] = {k: [] for k in planners}
    for b in budgets:
        for family, planner in planners.items():
            t0 = time.perf_counter()
            try:
                plan = planner.plan(b)
            except Exception as e:  # an infeasible budget for this technique: reported, not timed
                log(f"  {family} {format_size(b)}: {type(e).__name__}: {str(e)[:120]}")
                continue
            plan_times[family].append(setup[family] + time.perf_counter() - t0)
            m, p, bf = fresh_copy(w.model)
            if isinstance(plan, Plan):
                plan.apply_(m)
            else:
                if family == "fewbit+remat":
                    tightfit.convert_(m, tightfit.FewBit(bits=2))
                execute.apply(m, plan.options)
                m.__dict__["plan"] = plan
            v = variant(w, f"{family} {format_size(b)}", family, m, p, bf, b)
            finish(v, ref, seed)
            if v.peak > b:
                v.note += f"; OVER BUDGET by {(v.peak - b) / MiB:.1f} MiB"
            if not v.grads_equal:
                v.note += f"; grad SQNR {sqnr_of(v, ref, seed):.1f} dB"
            rows.append(v)

    log(f"timing {len(rows)} variants, {args.rounds} interleaved rounds ...")
    time_interleaved(rows, args.rounds, warmup=1, log=log)
    title = f"{w.desc}: {args.rounds} rounds, {torch.get_num_threads()} thread(s)"
    print_table(rows, base, title)

    checks = []
    for v in rows:
        if v.family not in ONE_KNOB:
            continue
        singles = [s for s in rows if s.family in SINGLE and s.peak <= v.peak and s.times]
        best = min(singles, key=lambda s: s.median, default=None)
        if best is None:
            checks.append(
                {"plan": v.name, "peak_mib": round(v.peak / MiB, 1), "single": None, "verdict": "none"}
            )
            continue
        summary = paired_summary(v.times, best.times)
        checks.append(
            {
                "plan": v.name,
                "peak_mib": round(v.peak / MiB, 1),
                "single": best.name,
                "single_peak_mib": round(best.peak / MiB, 1),
                "time_ratio_plan_over_single": round(v.median / best.median, 3),
                "paired": summary,
                "no_slower": v.median <= best.median * 1.02,
            }
        )
    for c in checks:
        log(f"target one-knob vs best single: {c}")
    fewbit_targets = []
    for limit, ratio in ((280, 1.10), (450, 1.03)):
        ok = [
            v
            for v in rows
            if v.family == "plan+fewbit"
            and v.peak_above_params <= limit * MiB
            and v.median / base.median <= ratio
        ]
        fewbit_targets.append(
            {"above_params_mib": limit, "time_ratio": ratio, "met_by": [v.name for v in ok]}
        )
        met = [v.name for v in ok] or "NOT MET"
        log(f"target plan+fewbit <= {limit} MiB above params at <= x{ratio}: {met}")
    slowest = max((t for k in ("plan+fewbit",) for t in plan_times[k]), default=math.nan)
    log(f"planning time with few-bit, per budget (s): {[round(t, 1) for t in plan_times['plan+fewbit']]}")
    meta = meta_conditions() | {
        "workload": w.desc,
        "args": vars(args),
        "params_bytes": params_bytes,
        "budgets": budgets,
        "planning_s": plan_times,
        "planning_max_s_all_techniques": slowest,
        "one_knob_vs_single": checks,
        "fewbit_targets": fewbit_targets,
    }
    stem = args.results or f"planner_gpt2_{w.extra['tag']}"
    results.say_written(write_results(stem, rows, base, meta, title))


if __name__ == "__main__":
    main()
