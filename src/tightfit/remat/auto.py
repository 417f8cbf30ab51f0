"""Automatic rematerialization of an unmodified PyTorch model under a memory budget.

    model = tightfit.rematerialize(model, batch, budget="2GiB")   # then train as usual
    print(model.plan)

The budget is the ABSOLUTE live-tensor peak of one full training step (forward, loss, backward and the
optimizer step when ``optimizer`` is given) as the ruler ``tightfit.memory.LiveTracker`` measures it:
parameters, gradients, optimizer state, inputs, activations and temporaries all count. It is not a budget
for activations only, and not an allocator number (no caching or fragmentation on accelerators).

How, in four parts with one job each: ``StepRunner`` (``tightfit.remat.runner``) runs measured training
steps and restores the model; ``measure_chain`` (``tightfit.remat.chain``) finds the chain of blocks
(``tightfit.remat.blocks``), measures each group of identical blocks under each option (store, two
selective-checkpoint policies, full recompute, measured op-level options: ``tightfit.remat.measure``) and
whole steps without remat and with every block recomputed, which fix the constants of the chain DP
(``tightfit.remat.solvers.chain_costs``); ``BudgetSearch`` (``tightfit.remat.search``) solves the DP for
an internal budget (the fastest option per block, or segment of blocks: ``tightfit.remat.segments``),
measures the candidate with ``torch.utils.checkpoint`` applied (``tightfit.remat.execute``) and solves
again, lowered by the excess or raised by the slack; ``CompileBudgetSearch``
(``tightfit.remat.compile_search``) searches the compiler's own activation budget when planning for
``torch.compile``, and the faster measured of the two plans wins. The returned plan therefore measured
<= budget on this batch (same shapes => same peak on CPU; on accelerators the allocator may round up).

NOTE [ Planning is a query ]
  ``Planner`` measures the model once, when it is made (``Planner.measured``). ``Planner.plan(budget)``
  reads those measurements and never changes them: what one query learns (corrected constants, measured
  candidates, refused segments) stays in that query's search and is recorded in the plan it returns
  (``Plan.trials``), so a plan for one budget does not depend on which budgets were planned before. The
  compiler-budget grid (``Planner.compile_search.grid``) and the compiled step times of verified
  assignments (``Planner.measured.verifier.compiled_times``) are measurements of the model, reused by
  every query: each grid point and assignment measures the same whenever it is measured.

NOTE [ Side effects of planning ]
  Planning runs training steps. The RNG state of the CPU and of every device the model uses, parameters,
  buffers, gradients and optimizer state are restored afterwards (``StepRunner.restoring``), so training
  after ``rematerialize`` gives the same results as without it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from tightfit._step import LossFn
from tightfit.errors import UserError
from tightfit.memory.distributed import check_unwrapped
from tightfit.remat import execute
from tightfit.remat.blocks import Blocks
from tightfit.remat.budget import Budget, parse_budget
from tightfit.remat.chain import (
    ChainMeasurement,
    ChainModel,
    Progress,
    measure_chain,
    segments_off_note,
)
from tightfit.remat.compile_search import CompileBudgetSearch
from tightfit.remat.config import RematConfig
from tightfit.remat.options import Option
from tightfit.remat.plan import Decision, Plan
from tightfit.remat.runner import StepRunner
from tightfit.remat.search import BudgetSearch, Found
from tightfit.remat.solvers.chain_costs import Assignment, ChainCosts
from tightfit.remat.solvers.errors import InfeasibleBudget as _SolverInfeasible
from tightfit.sizes import format_size

__all__ = ["InfeasibleBudget", "Planner", "Progress", "rematerialize"]


class InfeasibleBudget(_SolverInfeasible, UserError):
    """No remat plan keeps the training step under ``budget``; ``min_budget`` (bytes) is the measured peak
    of the most memory-frugal plan, so ``rematerialize(..., budget=err.min_budget)`` succeeds."""

    def __init__(self, budget: float, min_budget: float, what: str = "remat plan") -> None:
        super().__init__(budget, min_budget, what)
        self.args = (
            f"no {what} keeps the training step under {format_size(budget)} ({int(budget)} bytes); the "
            f"smallest feasible budget is {format_size(min_budget)} ({int(min_budget)} bytes, the measured "
            "peak with every block recomputed)",
        )


def check_no_plan(model: torch.nn.Module) -> None:
    """UserError when a plan is applied to ``model``: planning would measure the planned model (its
    conversions and patched forwards), not the model."""
    if "_tightfit_plan_reports" in model.__dict__:  # tightfit.plan's Plan.apply_ (conversions included)
        raise UserError(
            "a tightfit.plan plan is applied to this model: remove it with Plan.undo_(model) before "
            "planning again (planning measures the model as it is)"
        )
    if execute.applied(model) or execute.applied_compile_budget(model) is not None:
        raise UserError(
            "a remat plan is applied to this model: remove it with tightfit.remat.execute.undo(model) "
            "before planning again (planning measures the model as it is)"
        )


class Planner:
    """Measure a model once (``config``: how; ``RematConfig``), then plan for any number of budgets
    (``plan``, a query: NOTE [ Planning is a query ]) and apply plans (``apply``).

    ``progress(what, done, total)`` is called while measuring (the CLI draws a progress bar).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch: Any,
        loss_fn: LossFn | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        config: RematConfig | None = None,
        *,
        progress: Progress | None = None,
    ) -> None:
        config = RematConfig() if config is None else config
        if not isinstance(config, RematConfig):
            raise TypeError(f"config must be a tightfit.remat.RematConfig, got {type(config).__name__}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_unwrapped(model, "rematerialize")
        if not model.training:
            raise ValueError("rematerialize plans a training step: call model.train() first")
        check_no_plan(model)
        started = time.perf_counter()
        self.model, self.batch, self.config = model, batch, config
        notes: list[str] = []
        if config.compiled and (config.op_level or config.segments):  # planned_* are off: say why
            notes.append(
                "planned for torch.compile: op-level options and segments are off (they are eager-only)"
            )
        if config.compile_backend not in (None, "eager", "aot_eager"):
            notes.append(
                f"measured under backend {config.compile_backend!r}: the ruler sees tensors that go through "
                "the dispatcher, not buffers a code-generating backend (inductor) allocates itself, so "
                "measured peaks are lower bounds there; aot_eager measures exactly"
            )
        if not config.keep_output:
            notes.append("peaks count a step that frees the model output once the loss is computed")
        model_config = getattr(model, "config", None)
        if getattr(model_config, "use_cache", False):
            model_config.use_cache = False  # type: ignore[union-attr]
            notes.append(
                "set model.config.use_cache = False: a KV cache is useless in training, and a recomputed "
                "block would append to it twice (Hugging Face does the same under gradient checkpointing)"
            )
        # timed steps per measured plan (their median): compiled planning picks between a block plan and
        # the compiler's own budget by measured time, and one compiled step on a shared CPU is noisy
        reps = config.timing_reps if config.timing_reps is not None else 3 if config.compiled else 1
        self.runner = StepRunner(
            model,
            batch,
            loss_fn,
            optimizer,
            keep_output=config.keep_output,
            compile_backend=config.compile_backend,
            timing_reps=reps,
            flop_rate=config.flop_rate,
        )
        self.compile_search: CompileBudgetSearch | None = None
        if config.compiled and execute.compile_budget_supported():
            self.compile_search = CompileBudgetSearch(self._measure_compile_budget)
        with self.runner.restoring():
            self.measured: ChainMeasurement = measure_chain(
                self.runner,
                config,
                progress or (lambda what, done, total: None),
                notes,
                compile_budgets=self.compile_search is not None,
            )
        self.measure_time = time.perf_counter() - started

    # -- what measuring found (read-only views) ------------------------------------------------------
    @property
    def blocks(self) -> Blocks:
        return self.measured.blocks

    @property
    def chain(self) -> ChainCosts:
        return self.measured.chain

    @property
    def notes(self) -> list[str]:
        """What measuring found (every plan's notes start with these)."""
        return list(self.measured.notes)

    @property
    def baseline_peak(self) -> int:
        return self.measured.baseline_peak

    @property
    def baseline_time(self) -> float:
        return self.measured.baseline_time

    @property
    def min_budget(self) -> int:
        return self.measured.min_budget

    @property
    def store_plan(self) -> Assignment:
        return list(self.measured.store_plan)

    @property
    def frugal_plan(self) -> Assignment:
        return list(self.measured.frugal_plan)

    @property
    def frugal_peak(self) -> int:
        return self.measured.frugal_peak

    def measure_step(
        self,
        options: dict[str, list[Option]] | None = None,
        **kwargs: Any,
    ) -> tuple[int, float]:
        """(peak, seconds) of one training step with ``options`` applied (``StepRunner.measure``)."""
        return self.runner.measure(options, **kwargs)

    def timeline(self, options: dict[str, list[Option]] | None = None) -> list[Any]:
        """Live bytes after every op of one training step (``TimelinePoint``s) with ``options`` applied."""
        return self.runner.timeline(options)

    # -- planning -------------------------------------------------------------------------------------
    def _make_plan(
        self, budget: int, assignment: Sequence[Option], model: ChainModel, notes: list[str]
    ) -> Plan:
        chain = model.chain
        decisions = [
            Decision(b.name, b.path, b.call, b.group, o, chain.keep(i, o), chain.extra_time(i, o))
            for i, (b, o) in enumerate(zip(self.measured.blocks.blocks, assignment))
        ]
        return Plan(
            budget=budget,
            decisions=decisions,
            peak=chain.peak(assignment),
            time=chain.time(assignment),
            baseline_peak=self.baseline_peak,
            baseline_time=self.baseline_time,
            min_budget=self.min_budget,
            source=self.measured.blocks.source,
            notes=list(notes),
            config=self.config,
        )

    def resolve_budget(self, budget: int | float | str | Budget) -> int:
        """Bytes of any budget form (``tightfit.remat.budget``): a size, "min" (``min_budget``) or "xR"
        (``budget_for_overhead(R)``)."""
        return parse_budget(budget).resolve(self.min_budget, self.budget_for_overhead)

    def plan(self, budget: int | float | str | Budget, *, verify: bool = True, max_rounds: int = 4) -> Plan:
        """The fastest plan whose measured peak is <= ``budget`` (see the module docstring; also "min" and
        "x1.2": ``resolve_budget``); the same plan whatever was planned before (NOTE [ Planning is a
        query ]).

        Raises ``InfeasibleBudget`` when even the most frugal plan measures over the budget.
        """
        started = time.perf_counter()
        budget = self.resolve_budget(budget)
        m = self.measured
        if budget < m.min_budget:
            raise InfeasibleBudget(budget, m.min_budget)
        notes = list(m.notes)
        if budget >= m.baseline_peak:
            plan = self._make_plan(budget, m.store_plan, m.model, notes)
            plan.measured_peak, plan.measured_time = m.baseline_peak, m.baseline_time
            plan.notes.append("the model fits without remat")
            return self._finish(plan, started)
        # measured while measuring the model: not measured again
        known = {tuple(m.frugal_plan): m.frugal_peak, tuple(m.store_plan): m.baseline_peak}
        search: BudgetSearch[Assignment] = BudgetSearch(m.model, m.verifier.peak, known, verify=verify)
        verify_started = time.perf_counter()
        found = search.run(budget, float(m.chain.peak(m.frugal_plan)), max_rounds)
        if verify and found.candidate is not None:
            found = search.probe(budget, found, 0.02 * m.baseline_time)
        notes += [segments_off_note(r, self.runner) for r in found.refusals]
        chosen = self._chosen(budget, found, notes, verify)
        options = [d.option for d in chosen.decisions]
        if verify and tuple(options) in m.verifier.compiled_times:
            chosen.measured_time = m.verifier.compiled_times[tuple(options)]
        elif verify:
            _, chosen.measured_time = self.runner.measure(chosen.options, tracked=False)
        if verify and self.compile_search is not None:
            budgeted = self._compile_budget_plan(budget, chosen.notes)
            if budgeted is not None and budgeted.measured_time < (chosen.measured_time or float("inf")):
                budgeted.iterations, budgeted.trials = chosen.iterations, chosen.trials
                chosen = budgeted
        chosen.verify_time = time.perf_counter() - verify_started
        return self._finish(chosen, started)

    def _chosen(self, budget: int, found: Found[Assignment], notes: list[str], verify: bool) -> Plan:
        m = self.measured
        if found.candidate is None:  # (budgets at or above the no-remat peak returned above)
            chosen = self._make_plan(budget, m.frugal_plan, found.model, notes)  # type: ignore[arg-type]
            chosen.measured_peak = m.frugal_peak
            chosen.notes.append(
                f"no solved plan measured under the budget in {found.rounds} round(s); using the plan of "
                "least measured peak (measured while measuring the model)"
            )
        else:
            chosen = self._make_plan(budget, found.candidate, found.model, notes)  # type: ignore[arg-type]
            chosen.peak = found.predicted if found.predicted is not None else chosen.peak
            chosen.solve_budget = None if found.target is None else int(found.target)
            chosen.measured_peak = found.measured if verify else None
        chosen.iterations = found.rounds
        chosen.trials = [t.to_dict() for t in found.trials]
        return chosen

    def _measure_compile_budget(self, fraction: float) -> tuple[int, float]:
        return self.runner.measure(None, grads="check", compile_budget=fraction)

    def _compile_budget_plan(self, budget: int, notes: list[str]) -> Plan | None:
        """The plan that only sets the compiler's budget (``CompileBudgetSearch.best``), or None (with a
        note in ``notes`` when the model did not compile with a budget)."""
        assert self.compile_search is not None
        best, failure = self.compile_search.best(budget)
        if failure is not None:
            notes.append(
                "compiler budgets off: this model does not compile with one under "
                f"{self.config.compile_backend!r} ({failure})"
            )
        if best is None:
            return None
        fraction, peak, seconds = best
        plan = self._make_plan(budget, self.measured.store_plan, self.measured.model, notes)
        plan.compile_budget = fraction
        plan.peak, plan.time = peak, seconds  # measured: the memory model does not cover the compiler
        plan.measured_peak, plan.measured_time = peak, seconds
        plan.notes.append(
            f"the compiler's knapsack at budget {fraction:g} measured faster than the best block plan; "
            "gradients checked equal to the model's without remat"
        )
        return plan

    def budget_for_overhead(self, ratio: float) -> int:
        """The smallest budget whose plan the memory model predicts to step within ``ratio`` times the
        no-remat step (``ratio=1.2``: at most 20% slower), for "the least memory at this slowdown".

        Prediction only (bisection on the DP's budget, no step run): ``plan`` of the returned budget then
        measures its peak and time. The predicted times add up blocks timed alone, which on CPU CNNs
        over-predicts (the plan measures faster). Raises ValueError for a ratio below 1.
        """
        if not ratio >= 1.0:
            raise ValueError(f"ratio is a step-time ratio to the model without remat, >= 1; got {ratio!r}")
        m = self.measured
        limit = ratio * m.chain.time(m.store_plan)
        if m.chain.time(m.frugal_plan) <= limit:  # even the most frugal plan is fast enough
            return int(m.min_budget)
        least, _ = m.model.least_solved(
            float(m.min_budget), float(m.baseline_peak), lambda a: m.chain.time(a) <= limit
        )
        return int(least)

    def _finish(self, plan: Plan, started: float) -> Plan:
        plan.measure_time = self.measure_time
        plan.planning_time = self.measure_time + time.perf_counter() - started
        return plan

    def apply(self, plan: Plan) -> torch.nn.Module:
        """Patch the model in place to run ``plan``; sets ``model.plan``; returns the model."""
        execute.apply(self.model, plan.options, compile_budget=plan.compile_budget)
        self.model.__dict__["plan"] = plan
        return self.model


def rematerialize(
    model: torch.nn.Module,
    batch: Any,
    budget: int | float | str | Budget,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    config: RematConfig | None = None,
    *,
    verify: bool = True,
    progress: Progress | None = None,
) -> torch.nn.Module:
    """Make ``model`` train within ``budget`` by recomputing activations; returns the model to train.

    ``budget`` (bytes, or a size such as ``"2GiB"``) is the absolute live-tensor peak of one full training
    step on ``batch`` (see the module docstring); ``"min"`` asks for the smallest feasible peak and
    ``"x1.2"`` for the least memory predicted within 1.2 times the step time without remat (the forms of
    ``tightfit.remat.budget``, shared with ``tightfit.plan`` and the CLI). The model is patched in place
    (same object, same parameters, same ``state_dict`` keys; ``tightfit.remat.execute.undo(model)``
    removes the plan) and gets a ``.plan`` attribute (``Plan``: predicted ``peak``/``time``, measured ones,
    the decisions).
    Gradients are bit-identical to the unmodified model's, dropout included. In ``eval()`` mode or under
    ``torch.no_grad()`` nothing is recomputed. Call it in the context you train in (same autocast, same
    batch shapes): the plan is measured there. Hugging Face models get ``config.use_cache = False``.
    Raises ``InfeasibleBudget`` (with ``min_budget``) when no plan fits.

    ``config`` (``RematConfig``, recorded in the plan) says how to plan. ``config.options`` are the named
    in-block options; with ``config.op_level`` each block also gets options that keep
    the outputs of measured ops (``tightfit.remat.measure``). Those run in eager mode; under
    ``torch.compile`` they fall back to keeping matmul outputs (the measured op positions do not apply
    to a compiled trace). With ``config.segments`` a plan may also checkpoint runs of consecutive blocks as
    one region (``tightfit.remat.segments``: RNN time steps, groups of layers), which keeps only what enters
    the run; such plans are gradient-checked against the model without remat while planning. A region
    cannot span calls inside a compiled graph, so under ``torch.compile`` its blocks are checkpointed one
    by one (another peak than planned): for compiled training set ``config.compile_backend`` (below).

    ``config.keep_output``: the budget counts the model output (logits) as alive until the step ends, as in a
    loop that holds ``out = model(batch)`` through ``backward`` (and as ``tightfit.profile`` counts). Pass
    False for a loop that keeps only the loss (``loss = model(**batch).loss``, Hugging Face's Trainer):
    the output is then freed before the backward, which leaves that much more of the budget to activations.

    ``config.keep_tolerance``: of the plans predicted within this fraction of the fastest step time, the one
    keeping least after the forward is taken (0: the fastest).

    ``config.compile_backend`` (e.g. ``"inductor"``, ``"aot_eager"``): you will train ``torch.compile(model,
    backend=compile_backend)``. Whole steps are then measured compiled (each plan measured is compiled
    afresh after ``torch._dynamo.reset()``, so planning takes a few compilations and other compiled
    functions recompile on their next call), the budget holds for the compiled step, and op-level
    options and segments are off. Blocks are still measured one by one in eager mode. With torch >= 2.13
    the plan may instead set the compiler's own activation memory budget for this model's forward
    (``torch.autograd.graph.region_activation_memory_budget``, searched on a grid of 0.025, each point
    compiled and measured, and refused when its gradients differ from the model's without remat: the
    compiler recomputes dropout with other random numbers at low budgets) when that measures faster.
    The budget is read when the model's own forward is traced: compile the model, not its submodules.
    """
    budget = parse_budget(budget)  # a bad budget is refused before anything is measured or changed
    planner = Planner(model, batch, loss_fn, optimizer, config, progress=progress)
    return planner.apply(planner.plan(budget, verify=verify))
