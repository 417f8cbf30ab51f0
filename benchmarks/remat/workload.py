"""The remat benchmarks' workloads and their tightfit variants (shared by gpt2, cnn and lstm).

A `Workload` is a model, its batch and where its chain of blocks lives; `tightfit_variant` plans it for
one budget (`tightfit.rematerialize`, or one shared `tightfit.remat.Planner` with ``--reuse-planner``)
and wraps the result as a harness `Variant`; `add_tightfit_rows` does that for a list of budgets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.common.steps import MiB, fresh_copy, run_step, tensors_of
from benchmarks.remat.harness import Variant, check_grads, compile_variant, measure
from tightfit import zoo
from tightfit.sizes import format_size


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
    planner: Any = None  # a shared tightfit.remat.Planner (--reuse-planner)
    compile_planner: Any = None  # the same without op-level options and segments, for torch.compile


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
    from tightfit.remat import RematConfig

    if w.planner is not None:
        return int(w.planner.min_budget)
    m = fresh_copy(w.model)[0]
    try:
        tightfit.rematerialize(m, w.batch, 1, loss_fn=w.loss_fn, config=RematConfig(keep_output=False))
    except Exception as e:  # InfeasibleBudget (or the solvers' exception) carries min_budget
        mb = getattr(e, "min_budget", None)
        if mb is None:
            log(f"  rematerialize(budget=1 byte) raised {type(e).__name__} without min_budget: {e}")
        return None if mb is None else int(mb)
    log("  rematerialize accepted a 1-byte budget?!")
    return None


def share_planner(w: Workload) -> None:
    """--reuse-planner: measure the model once (``Planner``) and plan every budget from that."""
    from tightfit.remat import Planner, RematConfig

    t0 = time.perf_counter()
    w.planner = Planner(fresh_copy(w.model)[0], w.batch, w.loss_fn, config=RematConfig(keep_output=False))
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
        from tightfit.remat import Planner, RematConfig

        t0 = time.perf_counter()
        config = RematConfig(keep_output=False, compile_backend="aot_eager")
        w.compile_planner = Planner(fresh_copy(w.model)[0], w.batch, w.loss_fn, config=config)
        log(f"tightfit compiled Planner measured the model: {time.perf_counter() - t0:.1f}s")
    return w.compile_planner


def tightfit_variant(
    w: Workload, budget: int, ref_names: tuple[list[str], list[str]], compiled: bool, seed: int
) -> Variant:
    import tightfit
    from tightfit.remat import RematConfig

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
        config = RematConfig(keep_output=False, compile_backend="aot_eager" if compiled else None)
        out = tightfit.rematerialize(m, w.batch, budget, loss_fn=w.loss_fn, config=config)
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


