"""ResNet-like and U-Net-like CNNs: peak reduction at the budget where the step-time overhead is <= 20%.

Kusumoto et al. (NeurIPS 2019, "A Graph Theoretic Framework of Recomputation Algorithms for Memory-Efficient
Backpropagation") report peak-memory reductions of 36-81% on CNNs (ResNet, U-Net, PSPNet, ...). Here, in one
process per model: tightfit.rematerialize at budgets from its smallest feasible one to no-remat, per-block
`checkpoint` on every k-th block (the peer), and no remat; exact peaks (ruler), interleaved step times, and
torch.equal gradient and BatchNorm-buffer checks against the unmodified model. Then: the lowest measured
peak among correct variants with time ratio <= 1.20, as a reduction of the whole peak and of the part above
the parameters. With ``--overhead 1.2`` tightfit is also planned at the least budget its memory model
predicts within x1.20 (``Planner.budget_for_overhead``), beside the evenly spaced ones.

    python -m benchmarks.remat.cnn                     # width 16, 128 px: ~5 min, shared 2-core box
    python -m benchmarks.remat.cnn --rounds 11         # the published small-size table
    python -m benchmarks.remat.cnn --models resnet50 --width 64 --size 224 --budgets 6 --reuse-planner \\
        --overhead 1.2 --rounds 7             # the zoo's full sizes (U-Net: --models unet --rounds 5)

Results: benchmarks/results/latest/remat_cnn_<model>[_w<W>_<S>px].{json,csv,png} (and the JSON in history/).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import results
from benchmarks.common.steps import MiB, fresh_copy, reference_grads, run_step, tensors_of
from benchmarks.remat.harness import (
    Variant,
    meta_conditions,
    print_table,
    target_check,
    time_interleaved,
    write_results,
)
from benchmarks.remat.peers import per_block_checkpoint
from benchmarks.remat.workload import (
    Workload,
    add_tightfit_rows,
    finish,
    log,
    share_planner,
    timed_min_budget,
)

KUSUMOTO = "36-81% (Kusumoto et al. 2019, peak memory, several CNNs)"


def blocks_of(name: str, model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks the checkpoint peer wraps: ResNet bottlenecks; U-Net's inc, down and up blocks."""
    if name.startswith("resnet"):
        return [b for stage in model.stages for b in stage]
    return [model.inc, *model.downs, *model.ups]


def run_model(name: str, args: argparse.Namespace) -> dict:
    from tightfit import zoo

    model_f, batch_f = zoo.get(name)
    model = model_f(width=args.width).train()
    bsz = args.batch or (8 if name.startswith("resnet") else 4)
    batch = batch_f(batch_size=bsz, image_size=args.size)
    desc = f"zoo {name} width={args.width}, batch {bsz}, {args.size}px, BatchNorm train mode"
    w = Workload(name, model, batch, [], desc=desc)
    log(f"== {desc}")
    seed = 0
    ref_model, ref_params, ref_bufs = fresh_copy(model)
    ref_names = ([n for n, _ in ref_model.named_parameters()], [n for n, _ in ref_model.named_buffers()])
    ref = reference_grads(run_step(ref_model, batch), ref_params, seed, ref_bufs)
    del ref_model

    rows: list[Variant] = []
    m, p, bf = fresh_copy(model)
    rows.append(
        Variant("no remat", "baseline", run_step(m, batch), p, tensors_of(m) + tensors_of(batch), buffers=bf)
    )
    n_blocks = len(blocks_of(name, model))
    for k in args.ckpt_every:
        m, p, bf = fresh_copy(model)
        per_block_checkpoint(blocks_of(name, m), k)
        label = "ckpt every block" if k == 1 else f"ckpt every {k}th block"
        rows.append(
            Variant(
                f"{label} ({n_blocks})",
                "ckpt-every-k",
                run_step(m, batch),
                p,
                tensors_of(m) + tensors_of(batch),
                k,
                buffers=bf,
            )
        )
    for v in rows:
        finish(v, ref, seed)
    base = rows[0]

    if args.reuse_planner:
        share_planner(w)
    min_b = timed_min_budget(w)
    lo = min_b if min_b is not None else min(v.peak for v in rows)
    n = args.budgets
    budgets = sorted(
        {lo, base.peak, *(int(lo + (base.peak - lo) * (i + 1) / (n + 1)) for i in range(n))}
        | {v.peak for v in rows[1:] if v.peak >= lo}  # each peer's peak: the equal-peak comparisons
        | {overhead_budget(w, r) for r in args.overhead}
    )
    plan_times = add_tightfit_rows(w, budgets, rows, ref, ref_names, seed)

    log(f"timing {len(rows)} variants, {args.rounds} interleaved rounds ...")
    time_interleaved(rows, args.rounds, warmup=1, log=log)
    title = f"{name}: {desc}; {args.rounds} rounds, {torch.get_num_threads()} thread(s), shared machine"
    print_table(rows, base, title)
    checks = target_check(rows, base)

    summary = {"model": name, "desc": desc}
    for fam in ("tightfit", "ckpt-every-k"):
        ok = [v for v in rows if v.family == fam and v.grads_equal and v.median / base.median <= 1.20]
        if not ok:
            summary[fam] = None
            log(f"  {fam}: no correct variant within +20% step time")
            continue
        best = min(ok, key=lambda v: v.peak)
        red = 1 - best.peak / base.peak
        red_act = 1 - best.peak_above_params / base.peak_above_params
        summary[fam] = {
            "variant": best.name,
            "peak_mib": round(best.peak / MiB, 1),
            "time_ratio": round(best.median / base.median, 3),
            "peak_reduction": round(red, 4),
            "above_params_reduction": round(red_act, 4),
            "buffers_equal": best.buffers_equal,
        }
        log(
            f"  {fam}: lowest peak within +20% time: {best.name}: {best.peak / MiB:.1f} MiB "
            f"(x{best.median / base.median:.2f} time): peak -{100 * red:.1f}%, "
            f"above params -{100 * red_act:.1f}% "
            f"[Kusumoto et al.: {KUSUMOTO}]"
            + (
                ""
                if best.buffers_equal is not False
                else "; NOTE BatchNorm running stats differ from no-remat"
            )
        )
    if plan_times:
        log(f"  tightfit planning time per budget (s): {[round(x, 1) for x in plan_times]}")
    meta = meta_conditions() | {
        "desc": desc,
        "args": vars(args),
        "summary": summary,
        "target_check": checks,
        "planning_s": plan_times,
    }
    stem = f"remat_cnn_{name.split('-')[0]}"
    if (args.width, args.size) != (16, 128):  # the default size keeps the unsuffixed name
        stem += f"_w{args.width}_{args.size}px"
    results.say_written(write_results(stem, rows, base, meta, title))
    return summary


def overhead_budget(w: Workload, ratio: float) -> int:
    """The least budget the planner predicts to step within ``ratio`` x no remat (--overhead)."""
    budget = w.planner.budget_for_overhead(ratio)
    log(f"  budget predicted within x{ratio:g}: {budget / MiB:.1f} MiB")
    return budget


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["resnet50", "unet"])
    ap.add_argument("--width", type=int, default=16, help="channel width (zoo default 64)")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=None, help="batch (default 8 for ResNet, 4 for U-Net)")
    ap.add_argument("--ckpt-every", type=int, nargs="*", default=[1, 2])
    ap.add_argument(
        "--budgets", type=int, default=4, help="evenly spaced tightfit budgets between min and none"
    )
    ap.add_argument(
        "--overhead",
        type=float,
        nargs="*",
        default=[],
        help="also plan at the least budget predicted within each of these step-time ratios (e.g. 1.2; "
        "needs --reuse-planner)",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--reuse-planner",
        action="store_true",
        help="measure each model once (tightfit.remat.Planner) and plan every budget from it",
    )
    args = ap.parse_args(argv)
    if args.overhead and not args.reuse_planner:
        ap.error("--overhead asks the shared planner for a budget: add --reuse-planner")
    torch.set_num_threads(args.threads)
    summaries = [run_model(m, args) for m in args.models]

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"peak reduction at <= +20% step time, beside Kusumoto et al.'s {KUSUMOTO}")
    for c in (
        "model",
        "method",
        "variant",
        "time ratio",
        "peak reduction",
        "above-params reduction",
        "BN buffers",
    ):
        t.add_column(c)
    for s in summaries:
        for fam in ("tightfit", "ckpt-every-k"):
            r = s.get(fam)
            if r is None:
                t.add_row(s["model"], fam, "none within +20%", "", "", "", "")
            else:
                t.add_row(
                    s["model"],
                    fam,
                    r["variant"],
                    f"{r['time_ratio']:.2f}",
                    f"-{100 * r['peak_reduction']:.1f}%",
                    f"-{100 * r['above_params_reduction']:.1f}%",
                    {True: "==", False: "differ", None: "-"}[r["buffers_equal"]],
                )
    Console(width=160).print(t)


if __name__ == "__main__":
    main()
