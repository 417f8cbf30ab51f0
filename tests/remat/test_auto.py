"""rematerialize on tiny zoo models: measured peak <= budget at three budgets, gradients bit-identical
(dropout on), infeasible budgets, optimizers, autocast, eval mode and torch.compile."""

from __future__ import annotations

import pytest
import torch

import tightfit
from tightfit.remat import RematConfig, execute
from tightfit.remat import chain as remat_chain
from tightfit.remat.auto import InfeasibleBudget, Planner
from tightfit.remat.options import InSegment, KeepOps, Option, Segment
from tightfit.remat.runner import StepRunner
from tightfit.testing import ZOO_TINY, build, clone, grads_after_step, same_grads, step_peak


@pytest.mark.parametrize("name", list(ZOO_TINY))
def test_three_budgets_fit_and_gradients_are_identical(name: str) -> None:
    model, batch = build(name)
    reference = grads_after_step(clone(model), batch)
    keys = list(model.state_dict())
    planner = Planner(model, batch)
    assert planner.min_budget < planner.baseline_peak, "remat must lower the peak on this model"
    budgets = [planner.min_budget, (planner.min_budget + planner.baseline_peak) // 2, planner.baseline_peak]
    peaks = []
    for budget in budgets:
        plan = planner.plan(budget)
        planner.apply(plan)
        assert model.plan is plan
        peak = step_peak(model, batch)
        assert peak <= budget, f"{name}: measured {peak} > budget {budget}\n{plan}"
        assert plan.measured_peak == peak
        assert plan.peak > 0 and plan.time > 0
        assert same_grads(reference, grads_after_step(model, batch)), f"{name}: grads differ\n{plan}"
        assert list(model.state_dict()) == keys
        peaks.append(peak)
        execute.undo(model)
    assert peaks[0] < peaks[2]


def test_public_api_and_infeasible_budget() -> None:
    model, batch = build("gpt2-tiny")
    reference = grads_after_step(clone(model), batch)
    keys = list(model.state_dict())
    with pytest.raises(InfeasibleBudget) as info:
        tightfit.rematerialize(model, batch, budget="1MiB")
    err = info.value
    assert err.min_budget > 2**20 and "smallest feasible budget" in str(err)
    assert isinstance(err, tightfit.remat.solvers.errors.InfeasibleBudget)
    assert execute.applied(model) == {}  # nothing half-applied
    out = tightfit.rematerialize(model, batch, budget=int(err.min_budget))
    assert out is model and list(out.state_dict()) == keys
    assert step_peak(out, batch) <= err.min_budget
    assert out.plan.checkpointed and out.plan.measured_peak <= err.min_budget
    assert same_grads(reference, grads_after_step(out, batch))
    text = str(out.plan)
    assert "predicted" in text and "measured" in text and "transformer.h" in text
    assert "capture + measure" in text and 0 < out.plan.measure_time < out.plan.planning_time
    assert 0 < out.plan.verify_time < out.plan.planning_time - out.plan.measure_time
    assert '"decisions"' in out.plan.to_json()


def test_bad_config_is_refused_before_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    model, batch = build("gpt2-tiny")
    steps: list[object] = []
    monkeypatch.setattr(StepRunner, "measure", lambda *a, **k: steps.append(a))
    with pytest.raises(ValueError, match=r"keep_tolerance must be in \[0, 1\).*got 1.5"):
        RematConfig(keep_tolerance=1.5)
    with pytest.raises(ValueError, match="unknown remat options.*valid options"):
        RematConfig(options=("store", "everything"))
    with pytest.raises(ValueError, match="timing_reps"):
        RematConfig(timing_reps=0)
    with pytest.raises(TypeError, match="RematConfig"):
        Planner(model, batch, config={"keep_tolerance": 0.1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model.train"):
        Planner(model.eval(), batch)
    assert steps == [] and execute.applied(model) == {}


def test_keep_output_false_counts_a_step_that_frees_the_output() -> None:
    model, batch = build("gpt2-tiny")
    reference = grads_after_step(clone(model), batch)
    kept = Planner(clone(model), batch)
    freed = Planner(model, batch, config=RematConfig(keep_output=False))
    assert freed.baseline_peak == step_peak(model, batch, keep_output=False) < kept.baseline_peak
    assert freed.min_budget < kept.min_budget
    assert any("frees the model output" in n for n in freed.notes)
    # a budget between the two minimums: only feasible when the output is not kept
    budget = (freed.min_budget + kept.min_budget) // 2
    with pytest.raises(InfeasibleBudget):
        kept.plan(budget)
    freed.apply(freed.plan(budget))
    assert step_peak(model, batch, keep_output=False) <= budget
    assert same_grads(reference, grads_after_step(model, batch))


def test_optimizer_training_matches_and_planning_has_no_side_effects() -> None:
    model, batch = build("gpt2-tiny")
    ref = clone(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    planner = Planner(model, batch, optimizer=opt)
    budget = (planner.min_budget + planner.baseline_peak) // 2
    planner.apply(planner.plan(budget))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not opt.state and torch.equal(rng, torch.get_rng_state())
    assert step_peak(model, batch, opt) <= budget  # a steady-state step, AdamW state included
    # the measured step trained; retrain both from the same state and compare, step by step
    model.load_state_dict(before)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for seed in range(2):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            tightfit._step.forward_loss(m, batch).backward()
            o.step()
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_eval_no_grad_and_autocast() -> None:
    model, batch = build("bert-base-tiny")
    ref = clone(model)
    planner = Planner(model, batch)
    plan = planner.plan(planner.min_budget)
    planner.apply(plan)
    assert plan.checkpointed
    calls = []
    layer = model.bert.encoder.layer[0].output.dense
    layer.register_forward_hook(lambda *a: calls.append(1))
    ref.eval(), model.eval()
    out = tightfit._step.forward_loss(model, batch)
    out.backward()  # eval with grad enabled: nothing is recomputed
    assert len(calls) == 1
    assert torch.equal(out, tightfit._step.forward_loss(ref, batch))
    with torch.no_grad():
        assert torch.equal(tightfit._step.forward_loss(model, batch), tightfit._step.forward_loss(ref, batch))
    model.train(), ref.train()
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = grads_after_step(model, batch)
    assert len(calls) == 2  # forward + recompute in training
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b = grads_after_step(ref, batch)
    assert same_grads(a, b)


def test_composes_with_torch_compile_aot_eager() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, batch = build("gpt2-tiny", n_layer=2)  # dropout on: checkpoint under compile replays the RNG too
    ref = clone(model)
    planner = Planner(model, batch)
    plan = planner.plan(planner.min_budget)
    planner.apply(plan)
    assert plan.checkpointed
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    assert same_grads(grads_after_step(ref, batch), grads_after_step(compiled, batch))
    assert counter.frame_count >= 1  # the plan ran compiled, not in an eager fallback
    assert step_peak(compiled, batch) < planner.baseline_peak
    torch._dynamo.reset()


def test_compiled_planning_measures_and_keeps_the_compiled_step_within_budget() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    model, batch = build("gpt2-tiny", n_layer=2)
    ref = clone(model)
    planner = Planner(model, batch, config=RematConfig(compile_backend="aot_eager"))
    assert any("torch.compile" in n for n in planner.notes)
    planner.compile_search = None  # block plans only (the compiler's budget: the next test)
    budget = (planner.min_budget + planner.baseline_peak) // 2
    plan = planner.plan(budget)
    assert plan.checkpointed and plan.measured_time > 0
    eager_only = (KeepOps, Segment, InSegment)
    assert not any(isinstance(o, eager_only) for opts in plan.options.values() for o in opts)
    planner.apply(plan)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    assert same_grads(grads_after_step(ref, batch), grads_after_step(compiled, batch))
    frames = counter.frame_count
    assert frames >= 1
    peak = step_peak(compiled, batch)  # the compiled graphs, not an eager fallback or a recompile
    assert counter.frame_count == frames
    assert peak == plan.measured_peak <= budget
    # compiled times are the median of three steps: the choice of plan hinges on them
    steps = []
    runner = planner.runner
    runner.step = lambda: steps.append(1) or StepRunner.step(runner)  # type: ignore[method-assign]
    planner.measure_step(None, tracked=False)
    assert len(steps) == 3
    torch._dynamo.reset()


@pytest.mark.skipif(not execute.compile_budget_supported(), reason="needs torch >= 2.13")
def test_compiler_budget_plans_fit_and_never_take_a_budget_with_wrong_gradients() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    model, batch = build("gpt2-tiny", n_layer=2)  # dropout on
    eager_grads = grads_after_step(clone(model), batch)
    planner = Planner(model, batch, config=RematConfig(compile_backend="aot_eager"))
    search = planner.compile_search
    assert search is not None
    steps = search.steps

    def compiled(compile_budget: float) -> tuple[int, bool]:
        """(peak, gradients equal to eager) of the model compiled under ``compile_budget``."""
        m = execute.apply(clone(model), {}, compile_budget=compile_budget)
        torch._dynamo.reset()
        c = torch.compile(m, backend="aot_eager")
        equal = same_grads(eager_grads, grads_after_step(c, batch))
        return step_peak(c, batch), equal

    # PyTorch's knapsack recomputes dropout with other random numbers at low budgets on this model
    low_peak, low_equal = compiled(0.25)
    assert not low_equal
    assert search.best(low_peak) == (None, None)  # only wrong-gradient partitions fit there
    assert None in search.grid.values()  # ... which the search measured and refused
    budget, equal = compiled(0.8)  # a correct partition's peak as the budget
    assert equal and budget < planner.baseline_peak
    plan = planner._compile_budget_plan(budget, [])
    assert plan is not None and plan.checkpointed == []
    k = round(plan.compile_budget * steps)
    assert plan.compile_budget == k / steps >= 0.8 and plan.measured_peak <= budget
    if k + 1 < steps:  # the next grid point was measured: over budget or wrong gradients
        above = search.grid[k + 1]
        assert above is None or above[0] > budget
    planner.apply(plan)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    c = torch.compile(model, backend=counter)
    assert same_grads(eager_grads, grads_after_step(c, batch))
    assert step_peak(c, batch) == plan.measured_peak <= budget and counter.frame_count >= 1
    assert "compiler budget" in str(plan)
    torch._dynamo.reset()


@pytest.mark.skipif(not execute.compile_budget_supported(), reason="needs torch >= 2.13")
def test_compiler_budgets_are_turned_off_with_a_note_when_the_model_does_not_compile_with_one() -> None:
    model, batch = build("gpt2-tiny", n_layer=1)  # dropout: Inductor adds a seed op outside the region
    planner = Planner(model, batch, config=RematConfig(compile_backend="inductor"))
    assert planner.compile_search is not None
    notes: list[str] = []
    assert planner._compile_budget_plan(planner.baseline_peak - 1, notes) is None
    assert planner.compile_search.failed
    assert any("compiler budgets off" in n and "inductor" in n for n in notes)
    assert execute.applied(model) == {} and "forward" not in model.__dict__
    torch._dynamo.reset()


def test_budget_for_overhead_is_the_least_memory_predicted_within_the_slowdown() -> None:
    model, batch = build("gpt2-tiny")
    planner = Planner(model, batch)
    chain, model = planner.chain, planner.measured.model
    frugal = chain.time(planner.frugal_plan) / planner.baseline_time
    assert frugal > 1.05, "the test needs recomputation to cost time on this model"
    for ratio in (1.0 + (frugal - 1) / 3, 1.0 + 2 * (frugal - 1) / 3):
        budget = planner.budget_for_overhead(ratio)
        assert planner.min_budget <= budget < planner.baseline_peak
        solution = model.solve(budget)
        assert solution is not None and chain.time(solution) <= ratio * planner.baseline_time
        below = model.solve(budget * 0.99)  # 1% less: infeasible or slower
        assert below is None or chain.time(below) > ratio * planner.baseline_time
        plan = planner.plan(budget)
        assert plan.measured_peak <= budget
    assert planner.budget_for_overhead(frugal + 1) == planner.min_budget
    with pytest.raises(ValueError, match="ratio"):
        planner.budget_for_overhead(0.9)


def test_the_plan_is_the_fastest_predicted_of_those_measured_within_budget() -> None:
    """Where the memory model over-predicts (CNNs), the planner also measures faster plans predicted over
    the budget; whatever it measured, it returns the fastest (predicted) plan that measured within."""
    model, batch = build("unet-tiny")
    planner = Planner(model, batch)
    verified: list[list[Option]] = []  # the plans the search measured, in order (as in plan.trials)
    verifier = planner.measured.verifier
    measure = verifier.peak

    def recording(plan: list[Option]) -> int:
        verified.append(list(plan))
        return measure(plan)

    verifier.peak = recording  # type: ignore[method-assign]
    over_predicted = planner.chain.peak(planner.store_plan) - planner.baseline_peak
    assert over_predicted > 0.02 * planner.baseline_peak, "the test needs a model that is over-predicted"
    probed = 0  # plans predicted over the budget that measured within it
    for k in (1, 2, 3):
        budget = planner.min_budget + k * (planner.baseline_peak - planner.min_budget) // 4
        verified.clear()
        plan = planner.plan(budget)
        assert plan.measured_peak <= budget
        chosen = [d.option for d in plan.decisions]
        assert len(verified) == len(plan.trials)
        for other, trial in zip(verified, plan.trials):
            predicted, peak = trial["predicted"], trial["measured"]  # predicted when it was measured
            if peak <= budget:
                assert plan.time <= planner.chain.time(other) + 1e-12, (chosen, other)
                probed += predicted > budget
    assert probed > 0


def test_own_model_with_loss_fn() -> None:
    from torch import nn

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.drop = nn.Linear(32, 128), nn.Linear(128, 32), nn.Dropout(0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(self.drop(torch.tanh(self.fc1(x))))

    model = nn.Sequential(*[Layer() for _ in range(6)], nn.Linear(32, 3)).train()
    x = torch.randn(256, 32)

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return logits.logsumexp(-1).mean()

    def grads(m: torch.nn.Module) -> list[torch.Tensor | None]:
        for p in m.parameters():
            p.grad = None
        torch.manual_seed(3)
        loss_fn(m(x)).backward()
        return [p.grad for p in m.parameters()]

    reference = grads(clone(model))
    planner = Planner(model, x, loss_fn)
    budget = (planner.min_budget + planner.baseline_peak) // 2
    out = tightfit.rematerialize(model, x, budget, loss_fn=loss_fn)
    assert out.plan.checkpointed and out.plan.measured_peak <= budget
    assert same_grads(reference, grads(out))


@pytest.mark.parametrize("threshold", [0, 10**6])
def test_long_chains_time_the_baseline_without_the_recording_hooks(
    threshold: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recording step's time includes its hooks (~0.1 ms per module call); past RETIME_ABOVE_BLOCKS
    blocks the no-remat time comes from the faster of two extra plain timed steps instead."""
    model, batch = build("lstm-tiny")
    steps: list[tuple[object, bool, bool, float]] = []
    measure = StepRunner.measure

    def spy(self: StepRunner, options=None, **kwargs):  # noqa: ANN001, ANN003, ANN202
        peak, seconds = measure(self, options, **kwargs)
        steps.append((options, kwargs.get("timed", True), kwargs.get("tracked", True), seconds))
        return peak, seconds

    monkeypatch.setattr(remat_chain, "RETIME_ABOVE_BLOCKS", threshold)
    monkeypatch.setattr(StepRunner, "measure", spy)
    planner = Planner(model, batch)
    plain_timed = [s[3] for s in steps if s[:3] == (None, True, False)]
    assert len(plain_timed) == (2 if threshold == 0 else 0)
    assert planner.baseline_time > 0
    if plain_timed:
        assert planner.baseline_time == min(plain_timed)


def test_calibrated_times_predict_the_measured_step_of_the_plan_recomputing_the_most(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On accelerators (here forced on a CPU) the planner times the frugal plan's step and scales every
    option's predicted extra time so that the model predicts that step: blocks timed alone, each
    synchronized, do not add up to a GPU step whose kernels are queued back to back."""
    model, batch = build("gpt2-tiny")
    uncalibrated = Planner(clone(model), batch, config=RematConfig(calibrate_times=False))
    assert uncalibrated.chain.time_scale == 1.0
    assert not any("predicted extra times" in n for n in uncalibrated.notes)
    timed: list[tuple[dict, float]] = []
    measure = StepRunner.measure

    def spy(self: StepRunner, options=None, **kwargs):  # noqa: ANN001, ANN003, ANN202
        peak, seconds = measure(self, options, **kwargs)
        if options and kwargs.get("tracked", True) is False:
            timed.append((options, seconds))
        return peak, seconds

    monkeypatch.setattr(StepRunner, "measure", spy)
    planner = Planner(model, batch, config=RematConfig(calibrate_times=True))
    assert len(timed) == 1 and timed[0][0] == remat_chain.options_by_module(
        planner.blocks.blocks, planner.frugal_plan
    )
    seconds = timed[0][1]
    chain = planner.chain
    if seconds <= planner.baseline_time:  # recomputing measured free: no calibration, no note
        assert chain.time_scale == 1.0
        pytest.skip("recomputing measured free on this machine: nothing to calibrate to")
    unscaled = sum(chain.extra_time(i, o) for i, o in enumerate(planner.frugal_plan)) / chain.time_scale
    expected = (seconds - planner.baseline_time) / unscaled
    assert chain.time_scale == pytest.approx(min(max(expected, 0.1), 10.0))
    if 0.1 < expected < 10.0:
        assert chain.time(planner.frugal_plan) == pytest.approx(seconds)
    assert any("predicted extra times" in n for n in planner.notes)
    # every option's extra time is scaled alike, so the fastest plan for a budget is unchanged (with no
    # keep tolerance: the tolerance is a fraction of the whole predicted step, which the scale changes)
    budget = (planner.min_budget + planner.baseline_peak) // 2
    chain.keep_tolerance = 0.0
    chain.time_scale, before = 1.0, chain.solve(budget)
    chain.time_scale = 3.0
    assert before is not None and chain.solve(budget) == before
