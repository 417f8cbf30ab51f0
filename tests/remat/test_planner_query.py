"""``Planner.plan`` is a query: the same plan whatever was planned before; plans record the config they were
made with, round-trip JSON, and plans saved before configs were recorded still load and run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tightfit._rng import rng_devices
from tightfit.remat import Plan, Planner, RematConfig, execute
from tightfit.remat.options import Option
from tightfit.testing import build, clone, grads_after_step, same_grads, step_peak

DATA = Path(__file__).parent / "data"
# FLOP-counted times: two planners of the same model measure the same, so their plans can be compared
COUNTED = RematConfig(flop_rate=1e9)


def _budget(planner: Planner, fraction: float) -> int:
    return int(planner.min_budget + fraction * (planner.baseline_peak - planner.min_budget))


def _decisions(plan: Plan) -> list[Option]:
    return [d.option for d in plan.decisions]


def test_plan_b2_after_plan_b1_equals_a_fresh_planners_plan_b2() -> None:
    model, batch = build("lstm-tiny")
    used = Planner(model, batch, config=COUNTED)
    fresh = Planner(clone(model), batch, config=COUNTED)
    measured = (used.chain.A, used.chain.H, used.chain.time_scale, used.notes)
    b1, b2 = _budget(used, 0.65), _budget(used, 0.55)
    first = used.plan(b1)
    # the first query learned something: a candidate measured over its budget and corrected the model
    assert any(t["measured"] > b1 for t in first.trials), first.trials
    second, reference = used.plan(b2), fresh.plan(b2)
    assert _decisions(second) == _decisions(reference)
    assert second.peak == reference.peak and second.measured_peak == reference.measured_peak
    assert second.trials == reference.trials and second.notes == reference.notes
    assert (used.chain.A, used.chain.H, used.chain.time_scale, used.notes) == measured  # nothing moved
    assert _decisions(used.plan(b1)) == _decisions(first)  # and asking again gives the same answer


def test_a_plan_records_its_config_round_trips_json_and_can_be_made_again() -> None:
    model, batch = build("gpt2-tiny")
    config = RematConfig(flop_rate=1e9, keep_output=False, segments=False)
    planner = Planner(clone(model), batch, config=config)
    plan = planner.plan(_budget(planner, 0.4))
    assert plan.config == config
    loaded = Plan.from_json(plan.to_json())
    assert loaded.config == config and loaded.decisions == plan.decisions and loaded.peak == plan.peak
    assert loaded.to_dict() == plan.to_dict()
    again = Planner(clone(model), batch, config=loaded.config).plan(plan.budget)
    assert _decisions(again) == _decisions(plan) and again.measured_peak == plan.measured_peak


@pytest.mark.parametrize("name", ["gpt2-tiny", "lstm-tiny"])
def test_plans_saved_before_configs_were_recorded_load_and_run_as_measured(name: str) -> None:
    """The fixtures are plans saved as JSON by the string-option planner; on the same model and batch
    they reproduce their recorded peak to the byte, with identical gradients."""
    plan = Plan.from_json((DATA / f"plan_{name}_v0.json").read_text())
    assert plan.config is None and plan.trials == []
    assert all(isinstance(d.option, Option) for d in plan.decisions) and plan.checkpointed
    model, batch = build(name)
    reference = grads_after_step(clone(model), batch)
    execute.apply(model, plan.options)
    assert step_peak(model, batch) == plan.measured_peak
    assert same_grads(reference, grads_after_step(model, batch))
    assert "segment of" in str(plan)


def test_plan_options_store_the_calls_before_a_modules_first_planned_one() -> None:
    from tightfit.remat.options import RECOMPUTE, STORE, Segment
    from tightfit.remat.plan import Decision

    decisions = [
        Decision("cell[2]", "cell", 2, 0, RECOMPUTE, 1, 0.0),
        Decision("head", "head", 0, 1, Segment(2), 1, 0.0),
    ]
    plan = Plan(budget=10, decisions=decisions, peak=10, time=1.0)
    assert plan.options == {"cell": [STORE, STORE, RECOMPUTE], "head": [Segment(2)]}


def test_a_bad_budget_is_refused_before_anything_is_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    import tightfit
    from tightfit.remat.runner import StepRunner

    model, batch = build("gpt2-tiny")
    monkeypatch.setattr(StepRunner, "measure", lambda *a, **k: pytest.fail("measured"))
    with pytest.raises(ValueError):
        tightfit.rematerialize(model, batch, budget="two gigabytes")
    assert execute.applied(model) == {}


def test_planning_restores_the_generators_of_the_devices_it_uses() -> None:
    model, batch = build("gpt2-tiny")
    assert rng_devices(model.parameters()) == {}  # a CPU model: only the CPU generator moves
    budget = int(step_peak(clone(model), batch) * 0.8)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    plan = Planner(model, batch, config=COUNTED).plan(budget)
    assert plan.measured_peak is not None and plan.measured_peak <= budget
    assert torch.equal(torch.rand(3), expected)
