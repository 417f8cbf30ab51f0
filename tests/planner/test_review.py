"""Review fixes of the one-budget planner: refused candidates end the search, sketch seeds that survive
copies and recomputes, blocks measured under the autocast state they run in, lossy plans checked against
their floors, planning refused on a planned model, budget and option validation, JSON and offload plans."""

from __future__ import annotations

import copy
import dataclasses
import io
import math

import numpy as np
import pytest
import torch

import tightfit
from tightfit.errors import InvalidInput, UserError
from tightfit.planner import Plan, Planner
from tightfit.planner.core import InvalidAllow
from tightfit.planner.result import PlanDecision
from tightfit.planner.variants import Combined, Variant, convert_blocks, converted, undo_all
from tightfit.remat import execute
from tightfit.remat.blocks import find_blocks
from tightfit.remat.budget import InvalidBudget, InvalidBudgetType, parse_budget
from tightfit.remat.config import RematConfig
from tightfit.remat.measure import _measure_memory, _Run, measure_group
from tightfit.remat.options import RECOMPUTE, SAVE_MATMUL, STORE, KeepOps
from tightfit.remat.runner import StepRunner
from tightfit.remat.search import Refused
from tightfit.remat.segments import SegmentError
from tightfit.testing import build, clone, grads_after_step, same_grads, step_peak


@pytest.fixture(scope="module")
def gpt2() -> tuple[torch.nn.Module, object, list]:
    model, batch = build("gpt2-tiny")
    return model, batch, grads_after_step(clone(model), batch)


# -- 1. refused candidates -------------------------------------------------------------------------------
def test_every_checked_step_refused_ends_with_the_unmodified_model(monkeypatch, gpt2) -> None:
    """Every step with remat or a conversion applied fails the gradient check (as on a machine whose
    steps are not reproducible): planning ends, offers the unmodified model and names why."""
    model, batch, _ = gpt2
    measure = StepRunner.measure

    def refuse(self, options=None, **kwargs):  # noqa: ANN001, ANN003, ANN202
        peak = measure(self, options, **kwargs)
        if options and kwargs.get("grads") == "check":
            raise SegmentError("the plan gave other gradients than the model without remat")
        return peak

    monkeypatch.setattr(StepRunner, "measure", refuse)
    planner = Planner(model, batch)
    assert planner.min_budget == planner.baseline_peak
    assert any("refused" in n for n in planner.notes)
    with pytest.raises(tightfit.planner.InfeasibleBudget):
        planner.plan(planner.baseline_peak - 1)
    plan = planner.plan(planner.baseline_peak)
    assert plan.lossless and all(d.option == STORE for d in plan.decisions)


def test_the_planner_model_stops_offering_what_a_refusal_used(gpt2) -> None:
    model, batch, _ = gpt2
    planner = Planner(model, batch, config=RematConfig(segments=False))
    options = set(planner.chain.options(0))
    used = [RECOMPUTE] * len(planner.blocks)
    refused = planner.cost_model.refusing(used, Refused("differ"))
    assert RECOMPUTE in options and RECOMPUTE not in refused.chain.options(0)
    assert set(refused.chain.options(0)) == options - {RECOMPUTE}
    assert refused.solve(float(planner.baseline_peak)) != used


# -- 2. and 5. sketch seeds ----------------------------------------------------------------------------
def test_a_sketched_model_copies_and_pickles_with_its_own_weights(gpt2) -> None:
    model, batch, reference = gpt2
    paths = [f"transformer.h.{i}" for i in range(len(model.transformer.h))]
    reports = convert_blocks(model, Variant(sketch=0.5), paths)
    try:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        copied = copy.deepcopy(model)
        got = grads_after_step(model, batch)
        # dropout masks as without the sketch: every parameter no sketch touches has the same gradient
        names = [n for n, _ in model.named_parameters()]
        sketched = {
            n
            for n in names
            if n.startswith("transformer.h.") and n.endswith("weight") and ("attn.c_" in n or "mlp.c_" in n)
        }
        assert len(sketched) == 4 * len(paths)
        assert not any(torch.equal(reference[i], got[i]) for i, n in enumerate(names) if n in sketched)
        assert all(same_grads([reference[i]], [got[i]]) for i, n in enumerate(names) if n not in sketched)
        for other in (copied, loaded):  # equal weights, equal seeds: equal gradients
            assert same_grads(got, grads_after_step(other, batch))
        x = torch.randn(3, 7, model.config.n_embd)
        layer, mine = model.transformer.h[0].mlp.c_fc, copied.transformer.h[0].mlp.c_fc
        with torch.no_grad():
            before, theirs = mine(x), layer(x)
            mine.weight.add_(1.0)  # the copy's own weights: its output follows them, the original's not
            assert not torch.equal(mine(x), before) and torch.equal(layer(x), theirs)
    finally:
        undo_all(reports)


def test_a_sketched_block_recomputed_draws_the_forwards_sketch(gpt2) -> None:
    model, batch, _ = gpt2
    group = find_blocks(model, batch).groups[0]
    with converted(model, {Variant(sketch=0.5): [group.path]}):
        here = dataclasses.replace(group, module=model.get_submodule(group.path))
        store = _measure_memory(_Run(here, STORE, 1234))[3]
        for option in (RECOMPUTE, SAVE_MATMUL):  # the recompute draws the same sketch: same gradients
            assert same_grads(store, _measure_memory(_Run(here, option, 1234))[3]), option
        costs = measure_group(here, [STORE], op_level=True)  # keep-ops: exact whatever they keep
        keeps = [c for o, c in costs.items() if isinstance(o, KeepOps)]
        assert keeps and all(c.exact for c in keeps)
        model(**batch)  # a forward of the model: the next step, another sketch
        assert not same_grads(store, _measure_memory(_Run(here, STORE, 1234))[3])


# -- 3. autocast inside the model ----------------------------------------------------------------------
class _Autocast(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **batch: object) -> object:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(**batch)


def test_keep_ops_of_blocks_under_autocast_inside_the_model() -> None:
    inner, batch = build("llama-1b-tiny")
    model = _Autocast(inner)
    reference = grads_after_step(clone(model), batch)
    planner = Planner(model, batch, config=RematConfig(options=("store", "recompute"), segments=False))
    keep = [
        min(
            (o for o in planner.chain.options(i) if isinstance(o, KeepOps)),
            key=lambda o, i=i: planner.chain.keep(i, o),
        )
        for i in range(len(planner.blocks))
    ]
    peak, _ = planner.measure(keep)  # gradient-checked: Refused if they differed or the ops did
    decisions = planner._decisions(keep)
    plan = Plan(budget=peak, decisions=decisions, peak=peak, time=0.0, allow=planner.allow)
    for p in (plan, planner.plan(peak)):
        p.apply_(model)
        try:
            assert step_peak(model, batch) <= peak
            assert same_grads(reference, grads_after_step(model, batch))
        finally:
            Plan.undo_(model)


def test_a_block_running_other_ops_refuses_its_keep_ops() -> None:
    inner, batch = build("llama-1b-tiny")
    planner = Planner(inner, batch, config=RematConfig(options=("store", "recompute"), segments=False))
    keep = [
        next((o for o in planner.chain.options(i) if isinstance(o, KeepOps)), STORE)
        for i in range(len(planner.blocks))
    ]
    assert any(isinstance(o, KeepOps) for o in keep)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(Refused) as info:
        planner.measure(keep)  # the step runs other ops than the blocks were measured with
    assert "where its keep-ops option was measured" in str(info.value)
    assert info.value.options and info.value.options <= {o for o in keep if isinstance(o, KeepOps)}
    refused = planner.cost_model.refusing(keep, info.value)
    assert not set(info.value.options) & set(refused.chain.options(0))


# -- 4. lossy plans against their floors ---------------------------------------------------------------
def test_lossy_plans_are_refused_under_their_floor(gpt2) -> None:
    model, batch, _ = gpt2
    planner = Planner(model, batch, allow=("recompute", "fewbit"))
    plan = planner.plan((planner.min_budget + planner.baseline_peak) // 2)
    assignment = [d.option for d in plan.decisions]
    if plan.lossless:  # few-bit on every block instead
        assignment = [
            next((o for o in planner.chain.options(i) if isinstance(o, Combined)), STORE)
            for i in range(len(planner.blocks))
        ]
    planner.measure(assignment)
    per = planner.lossy_sqnr[tuple(assignment)]
    assert set(per) == {"fewbit"} and planner.min_grad_sqnr["fewbit"] <= per["fewbit"] < math.inf
    planner.min_grad_sqnr["fewbit"] = per["fewbit"] + 1.0
    try:
        with pytest.raises(Refused, match="floor") as info:
            planner.measure(assignment)
        assert info.value.options and all(isinstance(o, Combined) for o in info.value.options)
    finally:
        planner.min_grad_sqnr["fewbit"] = 10.0


# -- 6. a planned model ----------------------------------------------------------------------------------
def test_planning_a_planned_model_is_refused(gpt2) -> None:
    model, batch, _ = gpt2
    execute.apply(model, {"transformer.h.0": [RECOMPUTE]})
    try:
        with pytest.raises(UserError, match="execute.undo"):
            tightfit.plan(model, batch, "min")
        with pytest.raises(UserError, match="execute.undo"):
            tightfit.rematerialize(model, batch, "min")
    finally:
        execute.undo(model)
    fewbit = Combined(STORE, Variant(fewbit=2))
    d = PlanDecision("transformer.h.0", "transformer.h.0", 0, 0, fewbit, 0, 0.0, 1.0)
    Plan(budget=1, decisions=[d], peak=1, time=0.0).apply_(model)
    try:
        with pytest.raises(UserError, match="Plan.undo_"):
            tightfit.plan(model, batch, "min")
    finally:
        Plan.undo_(model)


# -- low -------------------------------------------------------------------------------------------------
def test_budgets_options_and_keys_are_validated(gpt2) -> None:
    model, batch, _ = gpt2
    assert parse_budget(np.int64(4096)).nbytes == 4096 and parse_budget(np.float32(2.0)).nbytes == 2
    for bad in (0, -1, "0B", "x0.9"):
        with pytest.raises(InvalidBudget):
            parse_budget(bad)
    with pytest.raises(InvalidBudgetType):
        parse_budget([1])
    assert issubclass(InvalidBudget, ValueError) and issubclass(InvalidBudget, UserError)
    for kwargs in (
        {"fewbit_bits": (2.5,)},
        {"fewbit_bits": (9,)},
        {"sketch_ratios": (0.0,)},
        {"sketch_ratios": "0.5"},
    ):
        with pytest.raises(InvalidInput):
            tightfit.plan(model, batch, "min", allow=("fewbit", "sketch"), **kwargs)
    with pytest.raises(InvalidAllow):
        tightfit.plan(model, batch, "min", allow=("quantize",))
    ratio = 0.1234567891234
    assert Variant.parse(Variant(sketch=ratio).key).sketch == ratio


def test_use_cache_restored_by_planning_and_off_once_applied(gpt2) -> None:
    model, batch, reference = gpt2
    model.config.use_cache = True
    try:
        planner = Planner(model, batch)
        assert model.config.use_cache is True
        plan = planner.plan(planner.min_budget)
        plan.apply_(model)
        try:
            assert model.config.use_cache is False
            assert same_grads(reference, grads_after_step(model, batch))
        finally:
            Plan.undo_(model)
    finally:
        model.config.use_cache = False


def test_json_round_trip_applies_to_another_instance(gpt2) -> None:
    model, batch, reference = gpt2
    planner = Planner(model, batch, allow=("recompute", "fewbit"))
    plan = planner.plan((planner.min_budget + planner.baseline_peak) // 2)
    other = clone(model)
    again = Plan.from_json(plan.to_json())
    assert [d.option for d in again.decisions] == [d.option for d in plan.decisions]
    plan.apply_(model)
    again.apply_(other)
    try:
        got = grads_after_step(model, batch)
        assert same_grads(got, grads_after_step(other, batch))
        assert step_peak(other, batch) == step_peak(model, batch) <= plan.budget
        assert plan.lossless == same_grads(reference, got)
    finally:
        Plan.undo_(model)
        Plan.undo_(other)


def test_a_hand_built_offload_plan_runs_on_a_simulated_target(gpt2) -> None:
    from tightfit.offload import SimulatedTarget

    model, batch, reference = gpt2
    planner = Planner(model, batch, allow=("recompute",))
    option = Combined(SAVE_MATMUL, Variant(offload=True))
    decisions = [
        PlanDecision(
            b.name, b.path, b.call, b.group, option if b.path.startswith("transformer.h.") else STORE, 0, 0.0
        )
        for b in planner.blocks
    ]
    plan = Plan(budget=planner.baseline_peak, decisions=decisions, peak=0, time=0.0)
    assert plan.techniques == ("recompute", "offload") and plan.lossless
    plan.apply_(model, offload_target=SimulatedTarget())
    try:
        assert (
            execute.applied(model)
            and any(
                type(m).__module__.startswith("tightfit.offload") or "offload" in type(m).__name__.lower()
                for m in model.modules()
            )
            or model.__dict__["_tightfit_plan_reports"]
        )
        assert step_peak(model, batch) <= planner.baseline_peak
        assert same_grads(reference, grads_after_step(model, batch))
    finally:
        Plan.undo_(model)
    assert execute.applied(model) == {} and "_tightfit_plan_reports" not in model.__dict__
