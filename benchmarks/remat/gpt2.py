"""tightfit.rematerialize against PyTorch's own rematerialization options: one Pareto table per model.

For the zoo GPT-2 (CPU config: 12 layers, d=256, 4 heads, vocab 4096; dropout 0.1 on, train mode) and the zoo
ResNet-like model, every variant below is a deep copy of the same model, run in ONE process:

  no remat (eager baseline) | tightfit.rematerialize at several budgets (smallest feasible .. no-remat, plus
  the peers' measured peaks) | per-block checkpoint on every k-th block | checkpoint_sequential(segments) |
  torch.compile(aot_eager) with activation_memory_budget b | tightfit's plan under torch.compile(aot_eager)

and gets: the exact peak of a full training step (ruler; grads count), the step time (median of interleaved
round-robin rounds; ratio to the eager no-remat baseline of the same rounds), and a torch.equal check of
every gradient against the unmodified eager model with the same seed (dropout on, so RNG replay is tested).
Then the target check: for every peer, the fastest tightfit variant whose measured peak is <= the peer's
(eager against eager, compiled against compiled). The harness's step frees the model output once the loss
is computed, so tightfit plans with ``keep_output=False`` (the same step: its budgets are the peaks measured
here).

    python -m benchmarks.remat.gpt2                    # default: reduced B/T (see --help), ~5 min
    python -m benchmarks.remat.gpt2 --full             # gpt2 B=8 T=256 (research), more budgets/rounds
    python -m benchmarks.remat.gpt2 --model gpt2 --batch 8 --seq 256

The published table (results remat_gpt2_b8t256, about an hour on one core):

    python -m benchmarks.remat.gpt2 --full --model gpt2 --reuse-planner --ckpt-every 1 2 4 --segments 2 4 6 \\
        --compile-budgets 1.0 0.8 0.4 --compiled-tightfit 4 --extra-budgets 2 --rounds 9 --threads 1

Results: benchmarks/results/latest/remat_<model>[_b<B>t<T>].{json,csv,png} (and the JSON in history/).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import results
from benchmarks.common.steps import MiB, fresh_copy, reference_grads, run_step, tensors_of
from benchmarks.remat.harness import (
    Variant,
    compile_variant,
    meta_conditions,
    print_table,
    target_check,
    time_interleaved,
    write_results,
)
from benchmarks.remat.peers import chain_blocks, install_sequential, per_block_checkpoint
from benchmarks.remat.workload import (
    Workload,
    add_tightfit_rows,
    compiled_planner,
    finish,
    gpt2_workload,
    log,
    resnet_workload,
    share_planner,
    tightfit_variant,
    timed_min_budget,
)
from tightfit.sizes import format_size


# ------------------------------------------------------------------------------------------- the run
def build_peers(
    w: Workload,
    ck_every: list[int],
    segments: list[int],
    compile_budgets: list[float],
    seed: int,
    ref,
    ref_names,
) -> list[Variant]:
    n_blocks = len(chain_blocks(w.model, w.chain_paths))
    track_of = lambda m: tensors_of(m) + tensors_of(w.batch)  # noqa: E731
    out: list[Variant] = []
    m, p, bf = fresh_copy(w.model)
    out.append(Variant("no remat", "baseline", run_step(m, w.batch, w.loss_fn), p, track_of(m), buffers=bf))
    for k in ck_every:
        m, p, bf = fresh_copy(w.model)
        per_block_checkpoint(chain_blocks(m, w.chain_paths), k)
        name = "ckpt every block" if k == 1 else f"ckpt every {k}th block"
        out.append(
            Variant(name, "ckpt-every-k", run_step(m, w.batch, w.loss_fn), p, track_of(m), k, buffers=bf)
        )
    for s in segments:
        if s > n_blocks:
            continue
        m, p, bf = fresh_copy(w.model)
        install_sequential(m, w.chain_paths, s)
        out.append(
            Variant(
                f"ckpt_sequential seg={s}",
                "ckpt-seq",
                run_step(m, w.batch, w.loss_fn),
                p,
                track_of(m),
                s,
                buffers=bf,
            )
        )
    for b in compile_budgets:
        m, p, bf = fresh_copy(w.model)
        log(f"  compiling aot_eager budget {b} ...")
        out.append(
            compile_variant(
                f"compile aot_eager b={b}", "compile", m, p, w.batch, w.loss_fn, b, seed, buffers=bf
            )
        )
    return out


def pick_budgets(min_b: int | None, peer_peaks: list[int], base_peak: int, n_extra: int) -> list[int]:
    """Budgets: smallest feasible, peers' measured peaks, evenly spaced points, no-remat (3% dedupe)."""
    lo = min_b if min_b is not None else min(peer_peaks)
    cand = [lo, base_peak] + [p for p in peer_peaks if p >= lo]
    cand += [int(lo + (base_peak - lo) * (i + 1) / (n_extra + 1)) for i in range(n_extra)]
    out: list[int] = []
    for b in sorted(set(cand)):
        if not out or b > out[-1] * 1.03:
            out.append(b)
    return out


def run_workload(w: Workload, args: argparse.Namespace) -> None:
    seed = 0
    log(f"== {w.name}: {w.desc}")
    n_blocks = len(chain_blocks(w.model, w.chain_paths))
    log(f"   chain: {n_blocks} blocks in {w.chain_paths}")
    ref_model, ref_params, ref_bufs = fresh_copy(w.model)
    ref_names = ([n for n, _ in ref_model.named_parameters()], [n for n, _ in ref_model.named_buffers()])
    ref = reference_grads(run_step(ref_model, w.batch, w.loss_fn), ref_params, seed, ref_bufs)
    del ref_model

    log("building peers")
    rows = build_peers(w, args.ckpt_every, args.segments, args.compile_budgets, seed, ref, ref_names)
    for v in rows:
        finish(v, ref, seed)
    base = rows[0]

    if args.reuse_planner:
        share_planner(w)
    log("tightfit: smallest feasible budget ...")
    min_b = timed_min_budget(w)
    peer_peaks = [v.peak for v in rows[1:] if v.grads_equal and v.family != "compile"]
    budgets = pick_budgets(min_b, peer_peaks, base.peak, args.extra_budgets)
    plan_times = add_tightfit_rows(w, budgets, rows, ref, ref_names, seed)
    if args.compile_budgets:
        # planned compiled (peaks measured compiled): each compiled peer's peak as the budget, then the
        # smallest feasible compiled budget
        chosen = sorted({v.peak for v in rows if v.family == "compile"}, reverse=True)
        if w.planner is not None and int(compiled_planner(w).min_budget) not in chosen:
            chosen.append(int(compiled_planner(w).min_budget))
        for b in chosen[: args.compiled_tightfit]:
            log(f"  tightfit {format_size(b)} under torch.compile(aot_eager) ...")
            try:
                v = tightfit_variant(w, b, ref_names, True, seed)
            except Exception as e:
                log(f"  tightfit+compile {b / MiB:.1f} MiB FAILED: {type(e).__name__}: {e}")
                continue
            finish(v, ref, seed)
            rows.append(v)

    log(f"timing {len(rows)} variants, {args.rounds} interleaved rounds ...")
    time_interleaved(rows, args.rounds, warmup=1, log=log)
    for v in rows:
        if v.compiled and v.graphs_ran is False:
            v.note += "; compiled graphs did NOT run under the ruler"
    title = f"{w.name}: {w.desc} — {args.rounds} rounds, {torch.get_num_threads()} thread(s), shared machine"
    print_table(rows, base, title)
    checks = target_check(rows, base) if any(v.family.startswith("tightfit") for v in rows) else []
    if plan_times:
        log(
            f"tightfit planning time per budget (s): {[round(t, 1) for t in plan_times]}, "
            f"max {max(plan_times):.1f}s for {n_blocks} blocks (target < 30 s)"
        )
    meta = meta_conditions() | {
        "workload": w.name,
        "desc": w.desc,
        "args": vars(args),
        "blocks": n_blocks,
        "planning_s": plan_times,
        "target_check": checks,
    }
    stem = f"remat_{w.name}" + (f"_{w.extra['tag']}" if w.extra.get("tag") else "")
    results.say_written(write_results(stem, rows, base, meta, title))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all", choices=["all", "gpt2", "resnet"])
    ap.add_argument("--full", action="store_true", help="gpt2 B=8 T=256, more budgets and rounds")
    ap.add_argument("--batch", type=int, default=None, help="gpt2 batch (default 4; --full 8)")
    ap.add_argument("--seq", type=int, default=None, help="gpt2 sequence length (default 128; --full 256)")
    ap.add_argument("--resnet", default="resnet50", help="zoo name of the ResNet-like model")
    ap.add_argument("--image-batch", type=int, default=None, help="ResNet batch (zoo default if omitted)")
    ap.add_argument(
        "--image-size", type=int, default=None, help="ResNet image size (default 128; --full 224)"
    )
    ap.add_argument(
        "--image-width", type=int, default=None, help="ResNet stem width (default 16; the zoo's is 64)"
    )
    ap.add_argument(
        "--rounds", type=int, default=None, help="interleaved timing rounds (default 3; --full 5)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument(
        "--reuse-planner",
        action="store_true",
        help="measure the model once (tightfit.remat.Planner) and plan every budget from it; the "
        "planning time shown is plan.planning_time (measure + solve + verify), as one rematerialize call",
    )
    ap.add_argument("--ckpt-every", type=int, nargs="*", default=None)
    ap.add_argument("--segments", type=int, nargs="*", default=[2, 3, 4, 6])
    ap.add_argument("--compile-budgets", type=float, nargs="*", default=None)
    ap.add_argument("--compiled-tightfit", type=int, default=None, help="how many tightfit plans to compile")
    ap.add_argument("--extra-budgets", type=int, default=None, help="evenly spaced tightfit budgets to add")
    args = ap.parse_args(argv)
    full = args.full
    args.batch = args.batch or (8 if full else 4)
    args.seq = args.seq or (256 if full else 128)
    args.rounds = args.rounds or (5 if full else 3)
    args.image_size = args.image_size or (224 if full else 128)
    args.image_width = args.image_width or 16  # zoo default 64 makes a step ~10 s on one core at 224px
    if args.ckpt_every is None:
        args.ckpt_every = [1, 2, 3, 4] if full else [1, 2, 4]
    if args.compile_budgets is None:
        args.compile_budgets = [1.0, 0.8, 0.6, 0.4, 0.2, 0.1] if full else [1.0, 0.8, 0.4]
    if args.compiled_tightfit is None:
        args.compiled_tightfit = 3 if full else 2
    if args.extra_budgets is None:
        args.extra_budgets = 3 if full else 1
    torch.set_num_threads(args.threads)
    if args.model in ("all", "gpt2"):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        run_workload(gpt2_workload(args.batch, args.seq), args)
    if args.model in ("all", "resnet"):
        run_workload(resnet_workload(args.resnet, args.image_batch, args.image_size, args.image_width), args)


if __name__ == "__main__":
    main()
