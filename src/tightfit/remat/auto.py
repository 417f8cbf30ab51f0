"""Automatic rematerialization of an unmodified PyTorch model under a memory budget.

    model = tightfit.rematerialize(model, batch, budget="2GiB")   # then train as usual
    print(model.plan)

The budget is the ABSOLUTE live-tensor peak of one full training step (forward, loss, backward and the
optimizer step when ``optimizer`` is given) as the ruler ``tightfit.memory.LiveTracker`` measures it:
parameters, gradients, optimizer state, inputs, activations and temporaries all count. It is not a budget
for activations only, and not an allocator number (no caching or fragmentation on accelerators).

How: (1) the timed no-remat training step (a probe forward when planning compiled or estimated steps),
run with hooks, finds the chain of blocks (``tightfit.remat.blocks``); (2) each group of identical blocks
is measured once under each option: store, two selective-checkpoint policies, full recompute
(``tightfit.remat.measure``); (3) whole steps are measured without remat and with every block
recomputed, which fixes the constants of the chain memory model (``tightfit.remat.chainmodel``), and with
the plan of least predicted peak: the lower of the last two is the smallest feasible budget; (4) a DP
picks the fastest option per block, or segment of blocks (``tightfit.remat.segments``), under the budget;
(5) the plan is applied with ``torch.utils.checkpoint`` (``tightfit.remat.execute``) and measured; when
the measured peak is over the budget the internal budget is lowered by the excess (raised by the slack
when it is well under) and the DP runs again. The returned
plan therefore measured <= budget on this batch (same shapes => same peak on CPU; on accelerators the
allocator may round up). Planned for ``torch.compile`` (``compile_backend``), the block plan competes
with a plan that only sets the compiler's activation memory budget for the model's forward (the faster
measured one wins; ``Planner._compile_budget_plan``).

NOTE [ Side effects of planning ]
  Planning runs a few training steps. The RNG state, parameters, buffers, gradients and optimizer state
  are restored afterwards, so training after ``rematerialize`` gives the same results as without it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

from tightfit._step import LossFn, call_model, loss_of, training_step, wait_for_device
from tightfit.errors import UserError
from tightfit.memory import LiveTracker
from tightfit.memory.profile import ensure_optimizer_state
from tightfit.remat import execute
from tightfit.remat.blocks import Block, Blocks, find_blocks
from tightfit.remat.chainmodel import ChainCosts
from tightfit.remat.execute import OPTIONS, RECOMPUTE, STORE
from tightfit.remat.measure import OP_OPTIONS, OptionCost, measure_group, same_tensors, step_cost
from tightfit.remat.plan import Decision, Plan
from tightfit.remat.reads import record_reads
from tightfit.remat.segments import SegmentError, is_segment_option
from tightfit.remat.solvers.errors import InfeasibleBudget as _SolverInfeasible
from tightfit.sizes import format_size, parse_size


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


Progress = Callable[[str, int, int], None]  # (what, done, total)


class _Snapshot:
    """Everything a measurement step changes: RNG, parameters and buffers, grads, optimizer state."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.rng = torch.get_rng_state()
        self.grads = [(p, p.grad) for p in model.parameters()]
        self.model = model
        self.optimizer = optimizer
        self.state = None
        if optimizer is not None:
            self.state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
            self.opt_state = copy.deepcopy(optimizer.state_dict())
        else:
            self.buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def restore(self) -> None:
        torch.set_rng_state(self.rng)
        with torch.no_grad():
            if self.state is not None:
                for k, v in self.model.state_dict(keep_vars=True).items():
                    v.copy_(self.state[k])
                assert self.optimizer is not None
                self.optimizer.load_state_dict(self.opt_state)
            else:
                for b, saved in self.buffers:
                    b.copy_(saved)
        for p, g in self.grads:
            p.grad = g


def options_by_module(blocks: Sequence[Block], plan: Sequence[str]) -> dict[str, list[str]]:
    """A plan (one option per block call, in order) as ``execute.apply`` takes it: per module path, one
    option per call, calls before the first planned one stored."""
    out: dict[str, list[str]] = {}
    for b, o in zip(blocks, plan):
        calls = out.setdefault(b.path, [])
        while len(calls) < b.call:
            calls.append(STORE)
        calls.append(o)
    return out


class Planner:
    """Measure a model once, then plan for any number of budgets (``plan``) and apply plans (``apply``).

    Measuring runs: whole training steps without remat (one with the ruler, one timed that also records
    the blocks) and with every block recomputed, a forward without autograd recording what blocks and glue
    code read (with segments: ``tightfit.remat.reads``), and every option of every group of identical
    blocks in isolation. ``progress(what, done, total)`` is called as it goes (the CLI draws a progress bar).
    ``calibrate_times`` also times the step of the plan that recomputes the most and scales every predicted
    extra time to it (default: on accelerators, where blocks timed alone do not add up to the step).
    ``keep_tolerance``: of the plans predicted within this fraction of the fastest step time, ``plan``
    takes the one keeping least after the forward (``ChainCosts.keep_tolerance``).
    """

    GRAD_SEED = 1234  # RNG seed of the steps whose gradients are compared (segment plans, compiler budgets)
    COMPILE_BUDGET_STEPS = 40  # compiler budgets are searched on the grid k / 40 (steps of 0.025)
    RETIME_ABOVE_BLOCKS = 256  # more blocks: the no-remat step time is not taken from the recording step

    def __init__(
        self,
        model: torch.nn.Module,
        batch: Any,
        loss_fn: LossFn | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        options: Sequence[str] = OPTIONS,
        progress: Progress | None = None,
        timing_reps: int | None = None,
        flop_rate: float | None = None,
        op_level: bool = True,
        segments: bool = True,
        keep_output: bool = True,
        compile_backend: str | Callable[..., Any] | None = None,
        calibrate_times: bool | None = None,
        keep_tolerance: float = 0.01,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not model.training:
            raise ValueError("rematerialize plans a training step: call model.train() first")
        if not 0.0 <= keep_tolerance < 1.0:
            raise ValueError(
                f"keep_tolerance must be in [0, 1) (a fraction of the step time), got {keep_tolerance}"
            )
        bad = [o for o in options if o not in OPTIONS]
        if bad:
            raise ValueError(f"unknown remat options {bad}; valid options: {', '.join(OPTIONS)}")
        started = time.perf_counter()
        self.model, self.batch, self.loss_fn, self.optimizer = model, batch, loss_fn, optimizer
        self.options = [STORE, *[o for o in options if o != STORE]]
        if RECOMPUTE not in self.options:
            self.options.append(RECOMPUTE)
        # timed steps per measured plan (their median): compiled planning picks between a block plan and
        # the compiler's own budget by measured time, and one compiled step on a shared CPU ran 40% slow
        default_reps = 3 if compile_backend is not None else 1
        self.timing_reps = timing_reps if timing_reps is not None else default_reps
        # a torch.compile backend: whole steps (peaks, times) are measured compiled, as they will run
        self.compile_backend = compile_backend
        self.notes: list[str] = []
        if compile_backend is not None and (op_level or segments):
            op_level = segments = False
            self.notes.append(
                "planned for torch.compile: op-level options and segments are off (they are eager-only)"
            )
        if compile_backend not in (None, "eager", "aot_eager"):
            self.notes.append(
                f"measured under backend {compile_backend!r}: the ruler sees tensors that go through the "
                "dispatcher, not buffers a code-generating backend (inductor) allocates itself, so measured "
                "peaks are lower bounds there; aot_eager measures exactly"
            )
        self._runner: torch.nn.Module = model  # what the measured steps call (the compiled model, or it)
        self._compiled_times: dict[tuple[str, ...], float] = {}  # compiled step time of verified plans
        # compiled: also plan the compiler's own knapsack over the whole forward, scoped to this model
        self.compile_budgets = compile_backend is not None and execute.compile_budget_supported()
        self._budgeted: dict[int, tuple[int, float] | None] = {}  # grid point -> (peak, s); None: wrong grads
        self.op_level = op_level
        self.segments = segments  # may checkpoint runs of blocks as one region (tightfit.remat.segments)
        self.keep_output = keep_output  # the model output stays alive until the step ends
        self.flop_rate = flop_rate  # set: times from FLOP counts (tightfit.remat.estimate), else clocks
        # scale predicted extra times to a measured all-recomputed step (None: on accelerators only)
        self.calibrate_times = calibrate_times
        self.keep_tolerance = keep_tolerance
        if not keep_output:
            self.notes.append("peaks count a step that frees the model output once the loss is computed")
        self._progress = progress or (lambda what, done, total: None)
        config = getattr(model, "config", None)
        if getattr(config, "use_cache", False):
            config.use_cache = False  # type: ignore[union-attr]
            self.notes.append(
                "set model.config.use_cache = False: a KV cache is useless in training, and a recomputed "
                "block would append to it twice (Hugging Face does the same under gradient checkpointing)"
            )
        execute.undo(model)
        snap = _Snapshot(model, optimizer)
        try:
            self._measure()
        finally:
            snap.restore()
        self.measure_time = time.perf_counter() - started

    # -- measuring ----------------------------------------------------------------------------------
    def _step(self) -> None:
        training_step(self._runner, self.batch, self.loss_fn, self.optimizer)

    def _compiled(self) -> torch.nn.Module:
        """The model (with the plan applied) compiled afresh, and compiled already: one step outside the
        ruler traces it, so that the measured steps run the compiled graphs."""
        torch._dynamo.reset()
        compiled = torch.compile(self.model, backend=self.compile_backend)
        training_step(compiled, self.batch, self.loss_fn, None)
        for p in self.model.parameters():
            p.grad = None
        return compiled

    def _tracked_step(self, timeline: bool = False) -> Any:
        """One step measured as ``tightfit.profile`` measures it (the output stays alive until the step
        ends; optimizer state is created first by a step on zero gradients); returns the tracker."""
        if self.optimizer is not None:
            ensure_optimizer_state(self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
        else:
            for p in self.model.parameters():
                p.grad = None
        with LiveTracker(track=[self.model, self.optimizer, self.batch], timeline=timeline) as t:
            t.phase = "forward"
            output = call_model(self._runner, self.batch)
            loss = loss_of(output, self.loss_fn)
            if not self.keep_output:
                del output
                output = None
            t.phase = "backward"
            loss.backward()
            if self.optimizer is not None:
                t.phase = "optimizer"
                self.optimizer.step()
            del output, loss
        return t

    def timeline(self, options: dict[str, list[str]] | None = None) -> list[Any]:
        """Live bytes after every op of one training step (``TimelinePoint``s) with ``options`` applied."""
        snap = _Snapshot(self.model, self.optimizer)
        try:
            if options:
                execute.apply(self.model, options)
            return list(self._tracked_step(timeline=True).timeline)
        finally:
            execute.undo(self.model)
            snap.restore()

    def measure_step(
        self,
        options: dict[str, list[str]] | None = None,
        *,
        timed: bool = True,
        tracked: bool = True,
        grads: str | None = None,
        compile_budget: float | None = None,
    ) -> tuple[int, float]:
        """(peak bytes, step seconds) of one training step with ``options`` applied (None: no remat) and
        the compiler budget ``compile_budget`` (``execute.apply``).

        ``grads="capture"`` keeps the step's gradients as the reference, ``grads="check"`` raises
        ``SegmentError`` unless they equal it bit for bit (both seed the RNG alike). The model is
        restored afterwards (parameters, optimizer state, RNG, grads).
        """
        snap = _Snapshot(self.model, self.optimizer)
        try:
            if options or compile_budget is not None:
                execute.apply(self.model, options or {}, compile_budget=compile_budget)
            if self.compile_backend is not None:
                self._runner = self._compiled()
            if grads is not None:
                torch.manual_seed(self.GRAD_SEED)
            peak = self._tracked_step().peak if tracked or grads else -1
            if grads == "capture":
                self.reference_grads = [
                    None if p.grad is None else p.grad.clone() for p in self.model.parameters()
                ]
            elif grads == "check" and not same_tensors(
                self.reference_grads, [p.grad for p in self.model.parameters()]
            ):
                raise SegmentError("the plan gave other gradients than the model without remat")
            seconds = float("nan")
            if timed and self.flop_rate is not None:
                seconds = step_cost(self._step, self.flop_rate, self.flop_rate / 50)
            elif timed:
                runs = []
                for _ in range(max(1, self.timing_reps)):
                    wait_for_device()
                    t0 = time.perf_counter()
                    self._step()
                    wait_for_device()
                    runs.append(time.perf_counter() - t0)
                seconds = sorted(runs)[len(runs) // 2]
        finally:
            self._runner = self.model
            execute.undo(self.model)
            snap.restore()
        return peak, seconds

    def _find_blocks_timed(self) -> tuple[Blocks, float]:
        """The blocks, recorded during the timed no-remat training step (one step instead of a probe
        forward and a step). The recording hooks cost ~0.1 ms per module call: negligible for a dozen
        transformer layers, 18% of the step of an LSTM stepped 1000 times (4003 blocks), so a model with
        more than ``RETIME_ABOVE_BLOCKS`` blocks gets plain timed steps after it."""
        seconds: list[float] = []

        def run() -> None:
            wait_for_device()
            started = time.perf_counter()
            self._step()
            wait_for_device()
            seconds.append(time.perf_counter() - started)

        snap = _Snapshot(self.model, self.optimizer)
        try:
            blocks = find_blocks(self.model, self.batch, self.loss_fn, run=run)
        finally:
            snap.restore()
        return blocks, seconds[0]

    def _measure(self) -> None:
        total = 4
        grads = "capture" if self.segments or self.compile_budgets else None
        if self.flop_rate is None and self.compile_backend is None:
            self._progress("measuring no remat", 0, total)
            self.baseline_peak, _ = self.measure_step(None, timed=False, grads=grads)
            self._progress("finding blocks", 1, total)
            self.blocks, self.baseline_time = self._find_blocks_timed()
            if len(self.blocks) > self.RETIME_ABOVE_BLOCKS:
                # the faster of two plain steps: this time anchors every predicted time and overhead
                # ratio, and one step on a shared machine can run 20% slow (CPU LSTM: 2.29 s, median 1.91)
                self.baseline_time = min(self.measure_step(None, tracked=False)[1] for _ in range(2))
        else:  # FLOP-counted times or compiled steps: a probe forward, then the step
            self._progress("finding blocks", 0, total)
            self.blocks = find_blocks(self.model, self.batch, self.loss_fn)
            self._progress("measuring no remat", 1, total)
            self.baseline_peak, self.baseline_time = self.measure_step(None, grads=grads)
        groups = self.blocks.groups
        skips = self.blocks.skips
        if skips:
            names = [self.blocks.blocks[j].name for _, j in skips]
            self.notes.append(
                f"not a chain: {len(skips)} skip connection(s) into {', '.join(names[:4])}; "
                "skip tensors counted in the measured constant, and in the entry of a segment that holds them"
            )
        total = 3 + len(groups) * (len(self.options) + OP_OPTIONS)
        done = [2]
        self.group_costs: list[dict[str, OptionCost] | None] = []
        for gi, group in enumerate(groups):

            def tick(option: str, gi: int = gi) -> None:
                done[0] += 1
                self._progress(f"measuring block group {gi + 1}/{len(groups)} ({option})", done[0], total)

            try:
                self.group_costs.append(
                    measure_group(
                        group, self.options, on_option=tick, flop_rate=self.flop_rate, op_level=self.op_level
                    )
                )
            except RuntimeError as err:  # a block that cannot run on its own stays unplanned (glue)
                self.group_costs.append(None)
                self.notes.append(f"{group.path} is not planned: {err}")
        kept = [k for k, b in enumerate(self.blocks.blocks) if self.group_costs[b.group] is not None]
        self.blocks.blocks = [self.blocks.blocks[k] for k in kept]
        if not self.blocks.blocks:
            raise RuntimeError(f"no block of the model could be measured: {'; '.join(self.notes)}")
        blocks = self.blocks.blocks
        paths = dict(self.model.named_modules())
        later: list[int] = []
        seen: set[int] = set()
        acc = 0
        for b in reversed(blocks):
            later.append(acc)
            module = paths[b.path]
            if id(module) not in seen:
                seen.add(id(module))
                acc += sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
        later.reverse()
        self.chain = ChainCosts(
            [self.group_costs[b.group] for b in blocks],  # type: ignore[misc]
            later,
            self.baseline_time,
            reads=record_reads(self.model, self.batch, blocks) if self.segments else [],
            keep_tolerance=self.keep_tolerance,
        )
        self.store_plan = [STORE] * len(blocks)
        self.frugal_plan = [self._frugal(i) for i in range(len(blocks))]
        self._progress("measuring all blocks recomputed", done[0] + 1, total)
        self.frugal_peak, self.frugal_time = self.measure_step(self._options(self.frugal_plan), timed=False)
        self.chain.fit(self.store_plan, self.baseline_peak, self.frugal_plan, self.frugal_peak)
        # the least-keep plan need not have the least peak (recomputing a head can raise it): also measure
        # the plan the model predicts lowest, and keep whichever measures lower as the frugal plan
        lowest = self._lowest_predicted()
        if lowest is not None and lowest != self.frugal_plan:
            try:
                peak = self._verify(lowest)
            except SegmentError as err:
                self._disable_segments(err)
                lowest = self._lowest_predicted()
                peak = self._verify(lowest) if lowest is not None else self.frugal_peak
            if lowest is not None:
                self.chain.learn(lowest, peak)
            if lowest is not None and peak < self.frugal_peak:
                self.frugal_plan, self.frugal_peak = lowest, peak
        self.min_budget = min(self.baseline_peak, self.frugal_peak)
        calibrate = self.calibrate_times if self.calibrate_times is not None else self._on_accelerator()
        if calibrate and self.flop_rate is None and self.compile_backend is None:
            self._calibrate_times()
        self._progress("measured", total, total)

    def _on_accelerator(self) -> bool:
        return any(p.device.type != "cpu" for p in self.model.parameters())

    def _calibrate_times(self) -> None:
        """Scale every option's extra time so that the model predicts the measured time of the frugal plan's
        step. Blocks are timed alone, each synchronized; on a GPU the step's kernels are queued back to back
        (an H100 LSTM: 6.4 s predicted for a 3.7 s step), on a CPU they add up."""
        predicted = self.chain.time(self.frugal_plan) - self.baseline_time
        if predicted <= 0:
            return
        _, seconds = self.measure_step(self._options(self.frugal_plan), tracked=False)
        if seconds <= self.baseline_time:  # recomputing costs less than the timing noise: nothing to scale to
            return
        scale = min(max((seconds - self.baseline_time) / predicted, 0.1), 10.0)
        self.chain.time_scale = scale
        self.notes.append(
            f"predicted extra times x{scale:.2f}: the plan recomputing the most measured "
            f"{seconds:.3g} s per step against {self.baseline_time + predicted:.3g} s from blocks timed alone"
        )

    def _least_solved(
        self, lo: float, hi: float, accept: Callable[[list[str]], bool] = lambda plan: True
    ) -> tuple[float, list[str] | None]:
        """Bisection on the DP's budget over (lo, hi]: the least budget whose solution is accepted, and
        that solution (None when not even ``hi``'s is)."""
        best = self.chain.solve(hi, segments=self.segments)
        if best is not None and not accept(best):
            best = None
        for _ in range(30):
            if hi - lo <= max(1.0, 1e-3 * hi):
                break
            mid = (lo + hi) / 2
            plan = self.chain.solve(mid, segments=self.segments)
            if plan is None or not accept(plan):
                lo = mid
            else:
                hi, best = mid, plan
        return hi, best

    def _lowest_predicted(self) -> list[str] | None:
        """The plan of least predicted peak (bisection on the DP's budget), or None."""
        return self._least_solved(0.0, float(self.chain.peak(self.frugal_plan)))[1]

    def _disable_segments(self, err: SegmentError) -> None:
        """The model's code cannot be replayed as a segment: plan without segments from now on."""
        self.segments = False
        note = f"segments disabled: {err}"
        if self._on_accelerator() and not torch.are_deterministic_algorithms_enabled():
            note += (
                " (kernels on this device may not be deterministic, so two identical steps can differ: "
                "torch.use_deterministic_algorithms(True) makes the gradient check meaningful)"
            )
        self.notes.append(note)

    def _verify(self, plan: Sequence[str]) -> int:
        """The measured peak of ``plan``; with segments, its gradients are also checked (SegmentError; not
        under fake tensors).
        Compiled, its step time is measured too (``_compiled_times``), as compiling it again would cost
        more than the timed step."""
        fake = any(is_fake(p) for p in self.model.parameters())  # estimated: no values to compare
        check = "check" if any(is_segment_option(o) for o in plan) and not fake else None
        compiled = self.compile_backend is not None
        peak, seconds = self.measure_step(self._options(plan), timed=compiled, grads=check)
        if compiled:
            self._compiled_times[tuple(plan)] = seconds
        return peak

    def _frugal(self, i: int) -> str:
        """The exact option with the smallest keep for block i (full recompute unless it is not exact)."""
        costs = self.chain.costs[i]
        return min((o for o in costs if costs[o].exact), key=lambda o: (costs[o].keep, costs[o].bwd_peak))

    def _options(self, plan: Sequence[str]) -> dict[str, list[str]]:
        return options_by_module(self.blocks.blocks, plan)

    # -- planning -----------------------------------------------------------------------------------
    def _make_plan(self, budget: int, plan: Sequence[str]) -> Plan:
        decisions = [
            Decision(b.name, b.path, b.call, b.group, o, self.chain.keep(i, o), self.chain.extra_time(i, o))
            for i, (b, o) in enumerate(zip(self.blocks.blocks, plan))
        ]
        return Plan(
            budget=budget,
            decisions=decisions,
            peak=self.chain.peak(plan),
            time=self.chain.time(plan),
            baseline_peak=self.baseline_peak,
            baseline_time=self.baseline_time,
            min_budget=self.min_budget,
            source=self.blocks.source,
            notes=list(self.notes),
        )

    def plan(self, budget: int | float | str, *, verify: bool = True, max_rounds: int = 4) -> Plan:
        """The fastest plan whose measured peak is <= ``budget`` (see the module docstring).

        Raises ``InfeasibleBudget`` when even the most frugal plan measures over the budget.
        """
        started = time.perf_counter()
        budget = parse_size(budget)
        if budget < self.min_budget:
            raise InfeasibleBudget(budget, self.min_budget)
        if budget >= self.baseline_peak:
            plan = self._make_plan(budget, self.store_plan)
            plan.measured_peak, plan.measured_time = self.baseline_peak, self.baseline_time
            plan.notes.append("the model fits without remat")
            return self._finish(plan, started)
        # The internal budget ``target`` the DP solves for: lowered by the excess when a plan measures
        # over, raised by the slack when it measures well under, then bisected between the highest target
        # known to fit and the lowest known not to (the memory model can be far off either way, e.g. for
        # RNN cells whose outputs live to the end of the forward).
        target = float(budget)
        floor = float(self.chain.peak(self.frugal_plan))
        fits, over = None, None  # highest target whose plan measured <= budget, lowest that did not
        # measured peak per plan; the plans measured while measuring the model are not measured again
        seen = {tuple(self.frugal_plan): self.frugal_peak, tuple(self.store_plan): self.baseline_peak}
        rounds = 0
        verify_time = 0.0
        chosen: Plan | None = None
        while rounds < max_rounds:
            rounds += 1
            solution = self.chain.solve(target, segments=self.segments)
            if solution is None:
                break
            key = tuple(solution)
            if key not in seen:
                t0 = time.perf_counter()
                try:
                    seen[key] = self._verify(solution) if verify else 0
                except SegmentError as err:
                    self._disable_segments(err)
                    rounds -= 1
                    continue
                finally:
                    verify_time += time.perf_counter() - t0
            measured = seen[key]
            if measured <= budget:
                if chosen is None or self.chain.time(solution) < chosen.time:
                    chosen = self._make_plan(budget, solution)
                    chosen.solve_budget = int(target)
                    chosen.measured_peak = measured if verify else None
                fits = target
                if over is None:  # nothing measured over yet: when the model over-predicted this plan
                    slack = budget - measured  # and it left room, ask the DP for the room left
                    overpredicted = self.chain.peak(solution) - measured
                    if not verify or min(slack, overpredicted) <= 0.02 * budget:
                        break
                    target += slack
                    continue
                if over - target <= 0.01 * budget:
                    break
                target = (target + over) / 2
            else:
                self.chain.learn(solution, measured)
                over = target
                lowered = target - (measured - budget + max(1.0, 0.001 * budget))
                target = (fits + target) / 2 if fits is not None else max(lowered, floor)
                if over <= floor:
                    break
        if verify and chosen is not None:
            t0 = time.perf_counter()
            chosen = self._probe_overpredicted(budget, chosen, seen)
            verify_time += time.perf_counter() - t0
        if chosen is None:  # (budgets at or above the no-remat peak returned above)
            chosen = self._make_plan(budget, self.frugal_plan)
            chosen.measured_peak = self.frugal_peak
            chosen.notes.append(
                f"no solved plan measured under the budget in {rounds} round(s); using the plan of least "
                "measured peak (measured while measuring the model)"
            )
        chosen.iterations = rounds
        options = [d.option for d in chosen.decisions]
        if verify and tuple(options) in self._compiled_times:
            chosen.measured_time = self._compiled_times[tuple(options)]
        elif verify:
            t0 = time.perf_counter()
            _, chosen.measured_time = self.measure_step(self._options(options), tracked=False)
            verify_time += time.perf_counter() - t0
        if verify and self.compile_budgets:
            t0 = time.perf_counter()
            budgeted = self._compile_budget_plan(budget)
            verify_time += time.perf_counter() - t0
            if budgeted is not None and budgeted.measured_time < (chosen.measured_time or float("inf")):
                budgeted.iterations = rounds
                chosen = budgeted
        chosen.verify_time = verify_time
        return self._finish(chosen, started)

    def _probe_overpredicted(self, budget: int, chosen: Plan, seen: dict[tuple[str, ...], int]) -> Plan:
        """Where the memory model over-predicted measured plans (CNNs: by ~10% of the peak), faster
        plans predicted over the budget may measure under it: measure the DP's plans for the budget plus
        the largest over-prediction seen, and plus half of it, when they are predicted faster than
        ``chosen`` by over 2% of the no-remat step; take the fastest that measures <= ``budget``."""
        over = max((self.chain.peak(list(p)) - m for p, m in seen.items()), default=0)
        if over <= 0.02 * budget:
            return chosen
        for target in (budget + over, budget + over / 2):
            solution = self.chain.solve(target, segments=self.segments)
            if solution is None or self.chain.time(solution) >= chosen.time - 0.02 * self.baseline_time:
                continue
            key = tuple(solution)
            if key not in seen:
                try:
                    seen[key] = self._verify(solution)
                except SegmentError as err:
                    self._disable_segments(err)
                    return chosen
            if seen[key] <= budget:
                probed = self._make_plan(budget, solution)
                probed.solve_budget = int(target)
                probed.measured_peak = seen[key]
                return probed
            self.chain.learn(solution, seen[key])
        return chosen

    def _compile_budget_plan(self, budget: int) -> Plan | None:
        """The plan that only sets the compiler's budget, at the largest grid point whose compiled step
        measured <= ``budget`` with gradients equal to the model's without remat, or None.

        Bisection on the grid (the compiler's budget is a fraction of the activation memory its default
        partition saves: more is faster and peaks higher). A grid point whose gradients differ (the
        compiler recomputes random ops such as dropout with other random numbers at low budgets) counts as
        "save more". Every grid point is compiled and measured once per Planner.
        """
        lo, hi = 0, self.COMPILE_BUDGET_STEPS  # hi: the default partition (the no-remat step, over budget)
        best: tuple[int, int, float] | None = None
        while hi - lo > 1:
            k = (lo + hi) // 2
            if k not in self._budgeted:
                try:
                    self._budgeted[k] = self.measure_step(
                        None, grads="check", compile_budget=k / self.COMPILE_BUDGET_STEPS
                    )
                except SegmentError:
                    self._budgeted[k] = None
                except torch._dynamo.exc.BackendCompilerFailed as err:
                    # e.g. Inductor adds a random-seed op to a model with dropout outside the annotated
                    # region, and the partitioner refuses the partial annotation
                    self.compile_budgets = False
                    reason = str(err).strip().splitlines()
                    self.notes.append(
                        "compiler budgets off: this model does not compile with one under "
                        f"{self.compile_backend!r} ({reason[-1] if reason else type(err).__name__})"
                    )
                    return None
            measured = self._budgeted[k]
            if measured is None or measured[0] <= budget:
                lo = k
                if measured is not None:
                    best = (k, *measured)
            else:
                hi = k
        if best is None:
            return None
        k, peak, seconds = best
        plan = self._make_plan(budget, self.store_plan)
        plan.compile_budget = k / self.COMPILE_BUDGET_STEPS
        plan.peak, plan.time = peak, seconds  # measured: the memory model does not cover the compiler
        plan.measured_peak, plan.measured_time = peak, seconds
        plan.notes.append(
            f"the compiler's knapsack at budget {plan.compile_budget:g} measured faster than the best block "
            "plan; gradients checked equal to the model's without remat"
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
        limit = ratio * self.chain.time(self.store_plan)
        if self.chain.time(self.frugal_plan) <= limit:  # even the most frugal plan is fast enough
            return int(self.min_budget)
        least, _ = self._least_solved(
            float(self.min_budget), float(self.baseline_peak), lambda plan: self.chain.time(plan) <= limit
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
    budget: int | float | str,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    options: Sequence[str] = OPTIONS,
    verify: bool = True,
    progress: Progress | None = None,
    op_level: bool = True,
    segments: bool = True,
    keep_output: bool = True,
    compile_backend: str | Callable[..., Any] | None = None,
    keep_tolerance: float = 0.01,
) -> torch.nn.Module:
    """Make ``model`` train within ``budget`` by recomputing activations; returns the model to train.

    ``budget`` (bytes, or a size such as ``"2GiB"``) is the absolute live-tensor peak of one full training
    step on ``batch`` (see the module docstring). The model is patched in place (same object, same
    parameters, same ``state_dict`` keys; ``tightfit.remat.execute.undo(model)`` removes the plan) and
    gets a ``.plan`` attribute (``Plan``: predicted ``peak``/``time``, measured ones, the decisions).
    Gradients are bit-identical to the unmodified model's, dropout included. In ``eval()`` mode or under
    ``torch.no_grad()`` nothing is recomputed. Call it in the context you train in (same autocast, same
    batch shapes): the plan is measured there. Hugging Face models get ``config.use_cache = False``.
    Raises ``InfeasibleBudget`` (with ``min_budget``) when no plan fits.

    ``options`` are the named in-block options; with ``op_level`` each block also gets options that keep
    the outputs of measured ops (``tightfit.remat.measure``). Those run in eager mode; under
    ``torch.compile`` they fall back to keeping matmul outputs (the measured op positions do not apply
    to a compiled trace). With ``segments`` a plan may also checkpoint runs of consecutive blocks as one
    region (``tightfit.remat.segments``: RNN time steps, groups of layers), which keeps only what enters
    the run; such plans are gradient-checked against the model without remat while planning. A region
    cannot span calls inside a compiled graph, so under ``torch.compile`` its blocks are checkpointed one
    by one (another peak than planned): for compiled training pass ``compile_backend`` (below).

    ``keep_output``: the budget counts the model output (logits) as alive until the step ends, as in a
    loop that holds ``out = model(batch)`` through ``backward`` (and as ``tightfit.profile`` counts). Pass
    False for a loop that keeps only the loss (``loss = model(**batch).loss``, Hugging Face's Trainer):
    the output is then freed before the backward, which leaves that much more of the budget to activations.

    ``keep_tolerance``: of the plans predicted within this fraction of the fastest step time, the one keeping
    least after the forward is taken (0: the fastest).

    ``compile_backend`` (e.g. ``"inductor"``, ``"aot_eager"``): you will train ``torch.compile(model,
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
    planner = Planner(
        model,
        batch,
        loss_fn,
        optimizer,
        options=options,
        progress=progress,
        op_level=op_level,
        segments=segments,
        keep_output=keep_output,
        compile_backend=compile_backend,
        keep_tolerance=keep_tolerance,
    )
    return planner.apply(planner.plan(budget, verify=verify))
