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

    .venv/bin/python benchmarks/remat.py                 # default: reduced B/T (see --help), ~5 min
    .venv/bin/python benchmarks/remat.py --full          # gpt2 B=8 T=256 (research), more budgets/rounds
    .venv/bin/python benchmarks/remat.py --model gpt2 --batch 8 --seq 256

Results: benchmarks/results/remat_<model>.{csv,json,png}.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tightfit import zoo
from tightfit.sizes import format_size

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    MiB,
    SequentialRunner,
    Variant,
    check_grads,
    compile_variant,
    conditions,
    fresh_copy,
    measure,
    per_block_checkpoint,
    plot_pareto,
    print_table,
    reference_grads,
    run_step,
    target_check,
    tensors_of,
    time_interleaved,
    write_results,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    """A model, its batch and where its chain of blocks lives (for the peers' wrappers)."""

    name: str
    model: torch.nn.Module
    batch: Any
    chain_paths: list[str]  # containers (ModuleList/Sequential) holding the chain's blocks, in run order
    loss_fn: Callable | None = None
    desc: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    planner: Any = None  # a shared tightfit.remat.auto.Planner (--reuse-planner)
    compile_planner: Any = None  # the same without op-level options and segments, for torch.compile


def _get(model: torch.nn.Module, path: str) -> torch.nn.Module:
    return model.get_submodule(path)


def _set(model: torch.nn.Module, path: str, value: torch.nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, value)


def chain_blocks(model: torch.nn.Module, paths: list[str]) -> list[torch.nn.Module]:
    return [b for p in paths for b in _get(model, p)]


def install_sequential(model: torch.nn.Module, paths: list[str], segments: int) -> None:
    """Replace the chain's containers by one `checkpoint_sequential` runner over all of its blocks.

    Valid when the containers run back to back with nothing in between (GPT-2's `h`, ResNet's stages).
    """
    blocks = chain_blocks(model, paths)
    for i, p in enumerate(paths):
        kind = type(_get(model, p))
        items = [SequentialRunner(blocks, segments)] if i == 0 else []
        _set(model, p, kind(*items) if issubclass(kind, torch.nn.Sequential) else kind(items))


def gpt2_workload(batch: int, seq: int) -> Workload:
    """The zoo's gpt2-small-cpu."""
    model_f, batch_f = zoo.get("gpt2-small-cpu")
    model = model_f()
    b = dict(batch_f(batch_size=batch, seq_len=seq))
    src = "tightfit.zoo gpt2-small-cpu"
    b["use_cache"] = False  # a KV cache in training would keep every layer's k/v alive through checkpointing
    model.train()
    desc = f"{src}, B={batch}, T={seq}, dropout 0.1"
    return Workload("gpt2", model, b, ["transformer.h"], desc=desc, extra={"tag": f"b{batch}t{seq}"})


def resnet_workload(name: str, batch: int | None, size: int | None, width: int | None) -> Workload:
    model_f, batch_f = zoo.get(name)
    model = (model_f(width=width) if width else model_f()).train()
    b = batch_f(batch_size=batch, image_size=size)
    paths = [
        f"stages.{i}" for i in range(len(model.stages))
    ]  # zoo ResNet: stages[i] is a Sequential of blocks
    return Workload(
        name,
        model,
        b,
        paths,
        desc=f"tightfit.zoo {name}{f' width={width}' if width else ''}, batch {b['x'].shape[0]}, "
        f"image {b['x'].shape[-1]}, BatchNorm in train mode",
    )


# ------------------------------------------------------------------------------------------- tightfit
def min_feasible_budget(w: Workload) -> int | None:
    """Ask the planner for an impossible budget and read the smallest feasible one from its error."""
    import tightfit

    if w.planner is not None:
        return int(w.planner.min_budget)
    m = fresh_copy(w.model)[0]
    try:
        tightfit.rematerialize(m, w.batch, 1, loss_fn=w.loss_fn, keep_output=False)
    except Exception as e:  # InfeasibleBudget (or the solvers' exception) carries min_budget
        mb = getattr(e, "min_budget", None)
        if mb is None:
            log(f"  rematerialize(budget=1 byte) raised {type(e).__name__} without min_budget: {e}")
        return None if mb is None else int(mb)
    log("  rematerialize accepted a 1-byte budget?!")
    return None


def share_planner(w: Workload) -> None:
    """--reuse-planner: measure the model once (``Planner``) and plan every budget from that."""
    from tightfit.remat.auto import Planner

    t0 = time.perf_counter()
    w.planner = Planner(fresh_copy(w.model)[0], w.batch, w.loss_fn, keep_output=False)
    log(f"tightfit Planner measured the model once: {time.perf_counter() - t0:.1f}s (--reuse-planner)")


def timed_min_budget(w: Workload) -> int | None:
    """`min_feasible_budget`, logged with the time it took."""
    t0 = time.perf_counter()
    min_b = min_feasible_budget(w)
    shown = None if min_b is None else f"{min_b / MiB:.1f} MiB"
    log(f"  smallest feasible budget: {shown} ({time.perf_counter() - t0:.1f}s)")
    return min_b


def add_tightfit_rows(
    w: Workload,
    budgets: list[int],
    rows: list[Variant],
    ref: Any,
    ref_names: tuple[list[str], list[str]],
    seed: int,
) -> list[float]:
    """One eager tightfit variant per budget appended to `rows` (failures logged, over-budget peaks
    noted); returns the planning time of each."""
    log(f"  budgets (MiB): {[round(b / MiB, 1) for b in budgets]}")
    plan_times = []
    for b in budgets:
        try:
            v = tightfit_variant(w, b, ref_names, False, seed)
        except Exception as e:  # report, keep going with the other budgets
            log(f"  tightfit budget {b / MiB:.1f} MiB FAILED: {type(e).__name__}: {e}")
            continue
        plan_times.append(v.setup_s)
        finish(v, ref, seed)
        if v.peak > b:
            v.note += f"; OVER BUDGET by {(v.peak - b) / MiB:.1f} MiB"
        rows.append(v)
    return plan_times


def _same_order(
    returned: torch.nn.Module, mine: list[torch.Tensor], ref_names: list[str], buffers: bool
) -> list:
    """The returned model's parameters (or buffers) in the reference order (same objects or by name)."""
    got = list(returned.buffers() if buffers else returned.parameters())
    if {id(p) for p in got} == {id(p) for p in mine}:
        return mine
    named = dict(returned.named_buffers() if buffers else returned.named_parameters())
    missing = [n for n in ref_names if n not in named]
    if missing:
        raise RuntimeError(f"rematerialize returned a model without {missing[:3]}...")
    return [named[n] for n in ref_names]


def compiled_planner(w: Workload) -> Any:
    """--reuse-planner's planner for compiled runs (whole steps measured under aot_eager), made once."""
    if w.compile_planner is None:
        from tightfit.remat.auto import Planner

        t0 = time.perf_counter()
        w.compile_planner = Planner(
            fresh_copy(w.model)[0], w.batch, w.loss_fn, keep_output=False, compile_backend="aot_eager"
        )
        log(f"tightfit compiled Planner measured the model: {time.perf_counter() - t0:.1f}s")
    return w.compile_planner


def tightfit_variant(
    w: Workload, budget: int, ref_names: tuple[list[str], list[str]], compiled: bool, seed: int
) -> Variant:
    import tightfit

    m, params, bufs = fresh_copy(w.model)
    t0 = time.perf_counter()
    if w.planner is not None:  # --reuse-planner: measure once, solve + verify per budget, apply to a copy
        from tightfit.remat import execute

        plan = (compiled_planner(w) if compiled else w.planner).plan(budget)
        execute.apply(m, plan.options, compile_budget=plan.compile_budget)
        m.__dict__["plan"] = plan
        out = m
        plan_s = float(getattr(plan, "planning_time", time.perf_counter() - t0))
    else:
        out = tightfit.rematerialize(
            m,
            w.batch,
            budget,
            loss_fn=w.loss_fn,
            keep_output=False,
            compile_backend="aot_eager" if compiled else None,
        )
        plan_s = time.perf_counter() - t0
    params = _same_order(out, params, ref_names[0], False)
    bufs = _same_order(out, bufs, ref_names[1], True)
    plan = getattr(out, "plan", None)
    pred_peak = getattr(plan, "peak", None)
    pred_time = getattr(plan, "time", None)
    name = f"tightfit {format_size(budget)}"
    if compiled:
        v = compile_variant(
            name + " +compile", "tightfit+compile", out, params, w.batch, w.loss_fn, None, seed, buffers=bufs
        )
        v.note = f"plan {plan_s:.1f}s, compile {v.setup_s:.1f}s"
        v.setup_s += plan_s
        v.budget = budget
    else:
        track = tensors_of(out) + tensors_of(w.batch)
        v = Variant(
            name,
            "tightfit",
            run_step(out, w.batch, w.loss_fn),
            params,
            track,
            budget,
            setup_s=plan_s,
            buffers=bufs,
        )
        v.note = f"plan {plan_s:.1f}s"
    v.plan_text = str(plan) if plan is not None else ""
    mp = getattr(plan, "measured_peak", None)
    if mp is not None:
        v.note += f"; planner measured {format_size(mp)}"
    v.predicted_peak = None if pred_peak is None else int(pred_peak)
    v.predicted_time = None if pred_time is None else float(pred_time)
    return v


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


def plan_summary(text: str) -> str:
    """The plan's header and its peak/step/planning/note lines (the per-block list can be thousands long)."""
    lines = text.splitlines()
    heads = ("peak:", "step:", "planning:", "note:")
    keep = lines[:1] + [ln for ln in lines[1:] if ln.strip().startswith(heads)]
    return "\n".join(keep)


def finish(v: Variant, ref, seed: int) -> None:
    check_grads(v, ref, seed)
    measure(v, seed)
    log(
        f"  {v.name}: peak {v.peak / MiB:.1f} MiB (above params {v.peak_above_params / MiB:.1f}), "
        f"grads {'equal' if v.grads_equal else f'WRONG (max |diff| {v.grad_max_diff:.3g})'}"
        + (f", setup {v.setup_s:.1f}s" if v.setup_s else "")
    )
    if v.plan_text:
        print(plan_summary(v.plan_text), flush=True)


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
    meta = conditions() | {
        "workload": w.name,
        "desc": w.desc,
        "args": vars(args),
        "blocks": n_blocks,
        "planning_s": plan_times,
        "target_check": checks,
        "command": "python " + " ".join(sys.argv),
    }
    stem = f"remat_{w.name}" + (f"_{w.extra['tag']}" if w.extra.get("tag") else "")
    paths = write_results(stem, rows, base, meta)
    png = plot_pareto(stem, rows, base, title)
    log(f"wrote {', '.join(str(p) for p in [*paths.values(), png] if p)}")


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
        help="measure the model once (tightfit.remat.auto.Planner) and plan every budget from it; the "
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
