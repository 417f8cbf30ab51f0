"""peft LoRA under a plan; plans per batch shape (covering, on-demand re-plan, warn, error); attach()."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from tests.integrations._tiny import FAST
from tightfit import zoo
from tightfit.errors import UserError
from tightfit.integrations import attach
from tightfit.integrations.hook import StepMeter
from tightfit.integrations.shapes import ShapePlans, covers, shape_key
from tightfit.memory import LiveTracker
from tightfit.remat.config import RematConfig


def _lora_model():
    peft = pytest.importorskip("peft")
    factory, batches = zoo.get("llama-1b-tiny")
    torch.manual_seed(0)
    base = factory()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"]
    )
    model = peft.get_peft_model(base, config)
    torch.manual_seed(1)
    return model, batches(batch_size=2)


def _grads(model, batch, seed=3):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_peft_lora_plan_gives_equal_gradients():
    model, batch = _lora_model()
    model.train()
    reference = _grads(model, batch)
    plans = ShapePlans(model, "1GiB", config=FAST)
    plans.prepare(batch)  # plan for a budget: then force recompute on every block for the comparison
    from tightfit.remat import execute

    assert "linear layers are frozen" in str(plans)
    planner_plan = plans.active.plan
    paths = [d.path for d in planner_plan.decisions]
    execute.apply(model, {p: ["recompute"] for p in paths})
    got = _grads(model, batch)
    assert set(got) == set(reference) and all("lora_" in n for n in got)
    assert all(torch.equal(got[n], reference[n]) for n in got)  # dropout in LoRA included
    plans.remove()


def test_peft_lora_sketch_skips_frozen_base_layers():
    import tightfit

    model, batch = _lora_model()
    report = tightfit.convert_(model, tightfit.Sketch(ratio=0.5), example=batch, measure=False)
    converted = [p for p, _, _ in report.converted]
    assert converted and all(".lora_" in p for p in converted)
    frozen = [p for p, why in report.skipped if "frozen weight" in why]
    assert any(p.endswith("q_proj.base_layer") for p in frozen)
    assert any(p.endswith("mlp.down_proj") for p in frozen)
    report.undo()


class _Tokens(nn.Module):
    """(batch, seq, d) through GELU MLP blocks: memory grows with the sequence length."""

    def __init__(self, d: int = 32, blocks: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(blocks)
        )

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x.square().mean()


def _step_peak(model, x, opt):
    opt.zero_grad(set_to_none=True)
    with LiveTracker(track=[model, x, opt]) as t:
        model(x).backward()
        opt.step()
    return t.peak


def test_shape_keys_cover_elementwise():
    big = shape_key({"ids": torch.zeros(2, 16), "mask": torch.zeros(2, 16)})
    small = shape_key({"mask": torch.zeros(2, 8), "ids": torch.zeros(2, 8)})
    assert covers(big, small) and not covers(small, big)
    assert not covers(shape_key(torch.zeros(4, 8)), shape_key(torch.zeros(2, 16)))
    assert not covers(shape_key(torch.zeros(4, 8)), shape_key(torch.zeros(4, 8, 1)))


def test_largest_plan_keeps_smaller_shapes_in_budget_and_larger_ones_replan():
    torch.manual_seed(0)
    model = _Tokens().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x16, x8, x4, x32 = (torch.randn(4, n, 32) for n in (16, 8, 4, 32))
    from tests.integrations._tiny import profile

    with torch.random.fork_rng():
        import copy

        m = copy.deepcopy(model)
        full = profile(
            m, x32, optimizer=torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), time_steps=0
        ).peak_bytes
    budget = int(0.85 * full)
    plans = ShapePlans(model, budget, optimizer=opt, config=FAST)
    assert plans.prepare(x16) is True and plans.planned == 1
    for x in (x8, x4):  # covered by the x16 plan: no planning, and within budget
        assert plans.prepare(x) is False
        assert _step_peak(model, x, opt) <= budget
    assert plans.prepare(x32) is True and plans.planned == 2  # larger: planned on demand
    assert plans.active.key == shape_key(x32)
    assert _step_peak(model, x32, opt) <= budget
    assert plans.prepare(x8) is False and plans.active.key == shape_key(x16)  # the smallest covering plan
    only_largest = ShapePlans(model, budget, optimizer=opt, config=FAST)  # one plan, for the largest shape
    only_largest.load({**plans.to_dict(), "plans": plans.to_dict()["plans"][1:]})
    assert only_largest.plans[0].plan.checkpointed  # the x32 plan recomputes under this budget
    for x in (x16, x8, x4):
        assert only_largest.prepare(x) is False and only_largest.active.key == shape_key(x32)
        assert _step_peak(model, x, opt) <= budget
    data = plans.to_dict()
    again = ShapePlans(model, budget, optimizer=opt, config=FAST)
    again.load(data)
    assert again.prepare(x32) is False and again.planned == 0 and again.active.loaded
    with pytest.raises(UserError, match="saved plans are for budget"):
        ShapePlans(model, budget + 1).load(data)
    plans.remove()


def test_larger_shape_warns_or_errors_when_asked():
    torch.manual_seed(0)
    model = _Tokens(blocks=2).train()
    small, large = torch.randn(2, 4, 32), torch.randn(2, 8, 32)
    plans = ShapePlans(model, "1GiB", config=FAST, on_new_shape="warn")
    plans.prepare(small)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert plans.prepare(large) is False
        plans.prepare(large)
    assert len([w for w in caught if "was not planned for" in str(w.message)]) == 1
    plans.on_new_shape = "error"
    with pytest.raises(UserError, match="larger than every planned shape"):
        plans.prepare(large)
    plans.remove()


def test_attach_plans_on_the_first_training_forward_and_skips_eval():
    torch.manual_seed(0)
    model = _Tokens(blocks=2).eval()  # eval mode, as a model fresh from from_pretrained
    x = torch.randn(2, 8, 32)
    hook = attach(model, "1GiB", config=FAST)
    with torch.no_grad():
        model(x)
    assert hook.plans.planned == 0
    model.train()
    loss = model(x)
    loss.backward()
    assert hook.plans.planned == 1 and "plan" in model.__dict__
    hook.remove()
    assert "plan" not in model.__dict__ and not model._forward_pre_hooks


def test_step_meter_leaves_pauses_out():
    meter = StepMeter()
    meter.start([])
    a = torch.ones(1000)
    meter.pause()
    b = torch.ones(100000)  # not counted
    del b
    meter.resume()
    del a
    assert meter.stop() == 4000


def test_bad_inputs():
    with pytest.raises(UserError, match="allow must name"):
        ShapePlans(nn.Linear(2, 2), "1GiB", allow="recompute,magic")
    with pytest.raises(UserError, match="grad_accumulation"):
        attach(nn.Linear(2, 2), "1GiB", grad_accumulation=0)


def test_lossy_allow_goes_to_the_planner_or_converts_the_whole_model(monkeypatch):
    from tightfit.fewbit import modules as fb
    from tightfit.integrations import shapes

    torch.manual_seed(0)
    model = _Tokens(blocks=2).train()
    x = torch.randn(2, 8, 32)
    calls = []

    class FakePlan:
        def apply_(self, m):
            m.__dict__["plan"] = self
            return m

        @staticmethod
        def undo_(m):
            m.__dict__.pop("plan", None)
            return m

    def fake_plan(m, batch, budget, *, allow, loss_fn, optimizer, config):
        calls.append((budget, allow))
        return FakePlan()

    monkeypatch.setattr(shapes, "_planner_plan", lambda: fake_plan)
    plans = ShapePlans(model, 10**9, allow=("recompute", "fewbit"), config=FAST)
    plans.prepare(x)
    assert calls == [(10**9, ("recompute", "fewbit"))] and isinstance(model.plan, FakePlan)
    assert not plans.conversions  # the planner decides per block
    plans.remove()
    assert "plan" not in model.__dict__

    monkeypatch.setattr(shapes, "_planner_plan", lambda: None)  # no planner: whole-model few-bit + remat
    plans = ShapePlans(model, 10**9, allow=("recompute", "fewbit"), config=FAST)
    plans.prepare(x)
    assert all(isinstance(b[1], fb.GELU) for b in model.blocks) and plans.conversions
    assert "planner is not available" in str(plans)
    plans.remove()
    assert all(type(b[1]) is nn.GELU for b in model.blocks)


@pytest.mark.parametrize("form", ["min", "x1.2"])
def test_relative_budget_forms_are_resolved_per_shape(form):
    torch.manual_seed(0)
    model = _Tokens(blocks=2).train()
    plans = ShapePlans(model, form, config=FAST, reserve=10**6)
    assert plans.budget is None and plans.reserve == 0 and plans.plan_budget == form
    plans.prepare(torch.randn(2, 8, 32))
    plan = plans.active.plan
    assert plan.measured_peak is not None and plan.budget >= plan.min_budget
    if form == "min":
        assert plan.budget == plan.min_budget
    assert plans.to_dict()["budget"] == form and form in str(plans)
    plans.remove()


def test_attach_leaves_submodules_kept_in_eval_mode_alone():
    """A frozen batch norm (eval mode inside a training model) stays in eval mode, its stats unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    model.train()
    model[1].eval()
    stats = (model[1].running_mean.clone(), model[1].running_var.clone())
    hook = attach(model, "1GiB", loss_fn=lambda y: y.sum(), config=FAST)
    for _ in range(2):
        model(torch.randn(32, 8)).sum().backward()
    assert hook.plans.planned == 1 and model.training and not model[1].training
    assert torch.equal(stats[0], model[1].running_mean) and torch.equal(stats[1], model[1].running_var)
    hook.remove()


def test_saved_plans_with_another_reserve_or_config_are_measured_again():
    torch.manual_seed(0)
    model = _Tokens(blocks=2).train()
    x = torch.randn(2, 8, 32)
    saved = ShapePlans(model, "1GiB", config=FAST, reserve=4096)
    saved.prepare(x)
    data = saved.to_dict()
    saved.remove()
    same = ShapePlans(model, "1GiB", config=FAST, reserve=4096)
    assert same.load(data) and same.prepare(x) is False and same.planned == 0
    same.remove()
    segments = RematConfig(op_level=False, segments=True, options=())
    for other in (
        ShapePlans(model, "1GiB", config=FAST),  # no accumulation: no reserve
        ShapePlans(model, "1GiB", config=segments, reserve=4096),  # another planning config
    ):
        assert other.load(data) is False and not other.plans
        assert "not used, planning again" in str(other)
        assert other.prepare(x) is True and other.planned == 1  # measured for its own reserve/config
        other.remove()
    with pytest.raises(UserError, match="saved plans are for budget"):
        ShapePlans(model, "2GiB", config=FAST, reserve=4096).load(data)
    lenient = ShapePlans(model, "2GiB", config=FAST, reserve=4096)
    assert lenient.load(data, strict=False) is False and "not used" in str(lenient)


def test_failed_lossy_conversion_is_undone_and_retried(monkeypatch):
    import tightfit.convert
    from tightfit.fewbit import modules as fb
    from tightfit.integrations import shapes

    torch.manual_seed(0)
    model = _Tokens(blocks=2).train()
    x = torch.randn(2, 8, 32)
    monkeypatch.setattr(shapes, "_planner_plan", lambda: None)  # no planner: whole-model conversions
    real = tightfit.convert.convert_
    failures = [RuntimeError("sketch failed")]

    def flaky(m, config, *a, **k):
        if type(config).__name__ == "Sketch" and failures:
            raise failures.pop()
        return real(m, config, *a, **k)

    monkeypatch.setattr(tightfit.convert, "convert_", flaky)
    plans = ShapePlans(model, 10**9, allow=("recompute", "fewbit", "sketch"), config=FAST)
    with pytest.raises(RuntimeError, match="sketch failed"):
        plans.prepare(x)
    assert all(type(b[1]) is nn.GELU for b in model.blocks) and not plans.conversions  # few-bit undone
    plans.prepare(x)  # retried, not skipped
    assert all(isinstance(b[1], fb.GELU) for b in model.blocks) and len(plans.conversions) == 2
    plans.remove()
