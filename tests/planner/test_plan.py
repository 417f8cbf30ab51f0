"""tightfit.plan on tiny zoo models: measured peak <= budget at three budgets, gradients torch.equal to the
unmodified model with the default (lossless) allow, techniques outside ``allow`` never used, lossy plans
above their SQNR floor, infeasible budgets naming the smallest feasible one, every budget form."""

from __future__ import annotations

import math

import pytest
import torch

import tightfit
from tightfit.errors import UserError
from tightfit.planner import Plan, Planner
from tightfit.planner.core import InfeasibleBudget
from tightfit.remat import execute
from tightfit.remat.budget import Budget, parse_budget
from tightfit.testing import build, clone, grads_after_step, same_grads, step_peak

MODELS = ["gpt2-tiny", "bert-base-tiny", "llama-1b-tiny", "resnet50-tiny"]


@pytest.fixture(scope="module", params=MODELS)
def lossless(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, object, Planner, list]:
    model, batch = build(request.param)
    reference = grads_after_step(clone(model), batch)
    return request.param, model, batch, Planner(model, batch), reference


def test_default_allow_fits_three_budgets_with_identical_gradients(lossless) -> None:
    name, model, batch, planner, reference = lossless
    keys = list(model.state_dict())
    lo, hi = planner.min_budget, planner.baseline_peak
    assert lo < hi, f"{name}: recompute must lower the peak"
    for budget in (lo, (lo + hi) // 2, hi):
        plan = planner.plan(budget)
        assert set(plan.techniques) <= {"recompute"}
        assert any("offload not offered" in n for n in plan.notes)  # the CPU: host memory is the same
        out = plan.apply_(model)
        try:
            assert out is model and model.plan is plan and list(model.state_dict()) == keys
            peak = step_peak(model, batch)
            assert peak <= budget, f"{name}: measured {peak} > {budget}\n{plan}"
            assert plan.measured_peak == peak
            assert plan.grads_equal and plan.lossless
            assert same_grads(reference, grads_after_step(model, batch)), f"{name}: gradients differ\n{plan}"
        finally:
            Plan.undo_(model)
        assert execute.applied(model) == {} and "plan" not in model.__dict__


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-1b-tiny"])
def test_fewbit_plans_meet_their_floor_and_only_use_what_is_allowed(name: str) -> None:
    model, batch = build(name)
    reference = grads_after_step(clone(model), batch)
    planner = Planner(model, batch, allow=("recompute", "fewbit"))
    budget = (planner.min_budget + planner.baseline_peak) // 2
    plan = planner.plan(budget)
    assert set(plan.techniques) <= {"recompute", "fewbit"}
    # without recompute, few-bit is the only way below the unmodified peak
    alone = Planner(model, batch, allow="fewbit").plan("min")
    assert alone.techniques == ("fewbit",) and alone.budget < planner.baseline_peak
    for p in (plan, alone):
        for d in p.decisions:
            if d.lossy:
                assert d.sqnr >= planner.min_grad_sqnr["fewbit"] and "fewbit" in d.techniques
        p.apply_(model)
        try:
            assert step_peak(model, batch) <= p.budget
        finally:
            Plan.undo_(model)
    assert alone.grad_sqnr is not None and alone.grad_sqnr > 0 and not alone.grads_equal
    text = str(alone)
    assert "fewbit" in text and "dB" in text and "measured" in text
    # planning and applying left the model as it was
    assert same_grads(reference, grads_after_step(model, batch))
    assert Plan.from_json(plan.to_json()).to_dict() == plan.to_dict()


def test_without_recompute_and_with_sketch_below_a_lowered_floor() -> None:
    model, batch = build("gpt2-tiny")
    planner = Planner(model, batch, allow=("fewbit", "sketch"), min_grad_sqnr=-30.0)
    plan = planner.plan("min")
    assert "recompute" not in plan.techniques and set(plan.techniques) <= {"fewbit", "sketch"}
    assert plan.budget == planner.min_budget < planner.baseline_peak
    plan.apply_(model)
    try:
        assert step_peak(model, batch) <= plan.budget
    finally:
        Plan.undo_(model)
    assert all(d.sqnr >= -30.0 for d in plan.decisions if d.lossy)
    strict = Planner(model, batch, allow=("sketch",), min_grad_sqnr={"sketch": 60.0})  # none is that close
    assert not strict.sqnr and strict.min_budget == strict.baseline_peak
    with pytest.raises(InfeasibleBudget) as info:
        strict.plan(strict.baseline_peak - 1)
    assert "sketch" in str(info.value) and info.value.min_budget == strict.baseline_peak


def test_infeasible_budget_names_the_smallest_and_it_works() -> None:
    model, batch = build("gpt2-tiny")
    state = torch.get_rng_state()
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(InfeasibleBudget) as info:
        tightfit.plan(model, batch, "1MiB")
    err = info.value
    assert isinstance(err, UserError) and "smallest feasible budget" in str(err) and err.min_budget > 2**20
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    plan = tightfit.plan(model, batch, int(err.min_budget))
    plan.apply_(model)
    try:
        assert step_peak(model, batch) <= err.min_budget
    finally:
        Plan.undo_(model)


def test_allow_and_budget_forms_are_validated_early() -> None:
    model, batch = build("gpt2-tiny")
    with pytest.raises(UserError, match="valid: recompute, offload, fewbit, sketch"):
        tightfit.plan(model, batch, "1GiB", allow=("recompute", "quantize"))
    for bad in ("x0.5", "xfast", "lots", "-3"):
        with pytest.raises(ValueError, match="min"):
            parse_budget(bad)
    assert parse_budget("x1.2") == Budget(ratio=1.2) and parse_budget("min") == Budget(minimum=True)
    assert parse_budget("2KiB") == Budget(nbytes=2048)


def test_overhead_budgets_in_rematerialize_and_the_planner() -> None:
    model, batch = build("gpt2-tiny")
    reference = grads_after_step(clone(model), batch)
    out = tightfit.rematerialize(model, batch, "x1.2")
    try:
        assert out.plan.measured_peak <= out.plan.budget <= out.plan.baseline_peak  # x1.2 may need all
        assert same_grads(reference, grads_after_step(out, batch))
    finally:
        execute.undo(model)
    planner = Planner(model, batch)
    budget = planner.resolve_budget("x1.2")
    assert planner.min_budget <= budget <= planner.baseline_peak
    assert planner.resolve_budget("min") == planner.min_budget
    assert not math.isnan(planner.plan("x1.2").measured_time)


def test_offload_is_one_more_option_kind_with_exact_gradients() -> None:
    from tightfit.offload import SimulatedTarget  # the mechanism on CPU tensors, saving no memory

    model, batch = build("gpt2-tiny")
    planner = Planner(model, batch, offload_target=SimulatedTarget())
    rows = {r[1]: r for r in planner.variant_table if r[0] == "transformer.h.0"}
    # store and what each save policy keeps, offloaded; gradients equal store's bit for bit
    assert {"offload", "offload+save-matmul", "offload+save-linear"} <= set(rows)
    assert all(math.isinf(r[4]) and r[4] > 0 for r in rows.values())
    # a simulated copy frees nothing, so nothing is offered, and the plan stays lossless
    assert all(r[2].startswith("not offered: keeps no less than") for r in rows.values())
    plan = planner.plan((planner.min_budget + planner.baseline_peak) // 2)
    assert "offload" not in plan.techniques and plan.grads_equal
