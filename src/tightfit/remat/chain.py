"""Measure a model into the chain DP's costs: blocks, per-group option costs, the fitted constants.

``measure_chain`` runs, through a ``StepRunner``: whole training steps without remat (one with the ruler,
one timed that also records the blocks) and with every block recomputed, a forward without autograd
recording what blocks and glue code read (with segments: ``tightfit.remat.reads``), and every option of
every group of identical blocks in isolation (``tightfit.remat.measure``). The two whole steps fix the
constants of the memory model (NOTE [ The memory model ] in ``tightfit.remat.solvers.chain_costs``); the
assignment the model then predicts lowest is measured too, and the lower of the two frugal steps sets the
smallest feasible budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from tightfit.remat.blocks import Block, Blocks, find_blocks
from tightfit.remat.config import RematConfig
from tightfit.remat.execute import OpSequenceError
from tightfit.remat.measure import OP_OPTIONS, measure_group
from tightfit.remat.options import RECOMPUTE, STORE, InSegment, Option, Segment, parse_option
from tightfit.remat.reads import record_reads
from tightfit.remat.runner import StepRunner
from tightfit.remat.search import Refused
from tightfit.remat.segments import SegmentError
from tightfit.remat.solvers.chain_costs import Assignment, ChainCosts, OptionCost

Progress = Callable[[str, int, int], None]  # (what, done, total)
RETIME_ABOVE_BLOCKS = 256  # more blocks: the no-remat step time is not taken from the recording step


def options_by_module(blocks: Sequence[Block], assignment: Sequence[Option]) -> dict[str, list[Option]]:
    """An assignment (one option per block call, in order) as ``execute.apply`` takes it: per module path,
    one option per call, calls before the first planned one stored."""
    out: dict[str, list[Option]] = {}
    for b, o in zip(blocks, assignment):
        calls = out.setdefault(b.path, [])
        while len(calls) < b.call:
            calls.append(STORE)
        calls.append(o)
    return out


@dataclass(frozen=True)
class ChainModel:
    """The chain DP as the budget search's cost model: ``ChainCosts`` with segments on or off."""

    chain: ChainCosts
    segments: bool

    def solve(self, budget: float) -> Assignment | None:
        return self.chain.solve(budget, segments=self.segments)

    def peak(self, assignment: Sequence[Option]) -> int:
        return self.chain.peak(assignment)

    def time(self, assignment: Sequence[Option]) -> float:
        return self.chain.time(assignment)

    def learned(self, assignment: Sequence[Option], measured: int) -> ChainModel:
        return replace(self, chain=self.chain.learned(assignment, measured))

    def refusing(self, assignment: Sequence[Option], refused: Refused | None = None) -> ChainModel:
        """Without the options ``refused`` names (a keep-ops option whose block ran other ops), or else
        without segments (a segment's replay differed from the model)."""
        if refused is not None and refused.options:
            return replace(self, chain=self.chain.without(refused.options))
        return replace(self, segments=False)

    def least_solved(
        self, lo: float, hi: float, accept: Callable[[Assignment], bool] = lambda a: True
    ) -> tuple[float, Assignment | None]:
        """Bisection on the DP's budget over (lo, hi]: the least budget whose solution is accepted, and
        that solution (None when not even ``hi``'s is)."""
        best = self.solve(hi)
        if best is not None and not accept(best):
            best = None
        for _ in range(30):
            if hi - lo <= max(1.0, 1e-3 * hi):
                break
            mid = (lo + hi) / 2
            solution = self.solve(mid)
            if solution is None or not accept(solution):
                lo = mid
            else:
                hi, best = mid, solution
        return hi, best


def segments_off_note(reason: str, runner: StepRunner) -> str:
    """Why a model plans without segments (its code could not be replayed as one region)."""
    note = f"segments disabled: {reason}"
    if runner.on_accelerator and not torch.are_deterministic_algorithms_enabled():
        note += (
            " (kernels on this device may not be deterministic, so two identical steps can differ: "
            "torch.use_deterministic_algorithms(True) makes the gradient check meaningful)"
        )
    return note


class Verifier:
    """Measured peaks of whole-step assignments on one model; segment assignments are gradient-checked
    (not under fake tensors) and raise ``Refused`` when their gradients differ. Compiled,
    the step time of each verified assignment is measured too (``compiled_times``: compiling it again
    would cost more than the timed step)."""

    def __init__(self, runner: StepRunner, blocks: Sequence[Block]) -> None:
        self.runner = runner
        self.blocks = blocks
        self.compiled_times: dict[tuple[Option, ...], float] = {}

    def peak(self, assignment: Sequence[Option]) -> int:
        check = any(isinstance(o, (Segment, InSegment)) for o in assignment) and not self.runner.fake
        compiled = self.runner.compile_backend is not None
        try:
            peak, seconds = self.runner.measure(
                options_by_module(self.blocks, assignment), timed=compiled, grads="check" if check else None
            )
        except SegmentError as err:
            raise Refused(str(err)) from err
        except OpSequenceError as err:  # the step ran other ops in a block than its keep-ops measured
            raise Refused(str(err), [err.option]) from err
        if compiled:
            self.compiled_times[tuple(assignment)] = seconds
        return peak


@dataclass
class ChainMeasurement:
    """What measuring a model found; fixed once measured (planning for a budget reads it, never changes
    it)."""

    blocks: Blocks
    model: ChainModel  # the chain DP's costs and constants, segments on unless the model refused them
    baseline_peak: int  # no remat, measured
    baseline_time: float
    store_plan: Assignment
    frugal_plan: Assignment  # the measured assignment of least peak
    frugal_peak: int
    verifier: Verifier
    notes: list[str] = field(default_factory=list)

    @property
    def chain(self) -> ChainCosts:
        return self.model.chain

    @property
    def min_budget(self) -> int:
        return min(self.baseline_peak, self.frugal_peak)


def _later_grads(model: torch.nn.Module, blocks: Sequence[Block]) -> list[int]:
    """G_i: bytes of the trainable parameters of the (distinct) block modules after block i."""
    paths = dict(model.named_modules())
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
    return later


def frugal_option(chain: ChainCosts, i: int) -> Option:
    """The exact option with the smallest keep for block i, the smaller backward peak between equal keeps
    (of remat's options: full recompute unless it is not exact)."""
    costs = chain.costs[i]
    return min((o for o in costs if costs[o].exact), key=lambda o: (costs[o].keep, costs[o].bwd_peak))


def measure_chain(
    runner: StepRunner, config: RematConfig, progress: Progress, notes: list[str], *, compile_budgets: bool
) -> ChainMeasurement:
    """Measure ``runner``'s model into a ``ChainMeasurement`` (see the module docstring); ``notes`` are
    the planner's so far, extended with what measuring finds. ``compile_budgets``: the planner will also
    search compiler budgets (their gradients are checked against the no-remat step's, captured here)."""
    options = [STORE, *[parse_option(o) for o in config.options if o != STORE.key]]
    if RECOMPUTE not in options:
        options.append(RECOMPUTE)
    segments, op_level = config.planned_segments, config.planned_op_level
    total = 4
    grads = "capture" if segments or compile_budgets else None
    if config.flop_rate is None and not config.compiled:
        progress("measuring no remat", 0, total)
        baseline_peak, _ = runner.measure(None, timed=False, grads=grads)
        progress("finding blocks", 1, total)
        blocks, baseline_time = runner.find_blocks_timed()
        if len(blocks) > RETIME_ABOVE_BLOCKS:
            # the faster of two plain steps: this time anchors every predicted time and overhead ratio,
            # and the recording step pays the hooks on every block call
            baseline_time = min(runner.measure(None, tracked=False)[1] for _ in range(2))
    else:  # FLOP-counted times or compiled steps: a probe forward, then the step
        progress("finding blocks", 0, total)
        with runner.restoring():
            blocks = find_blocks(runner.model, runner.batch, runner.loss_fn)
        progress("measuring no remat", 1, total)
        baseline_peak, baseline_time = runner.measure(None, grads=grads)
    groups = blocks.groups
    if blocks.skips:
        names = [blocks.blocks[j].name for _, j in blocks.skips]
        notes.append(
            f"not a chain: {len(blocks.skips)} skip connection(s) into {', '.join(names[:4])}; "
            "skip tensors counted in the measured constant, and in the entry of a segment that holds them"
        )
    total = 3 + len(groups) * (len(options) + OP_OPTIONS)
    done = 2
    group_costs: list[dict[Option, OptionCost] | None] = []
    for gi, group in enumerate(groups):

        def tick(option: Option, gi: int = gi) -> None:
            nonlocal done
            done += 1
            progress(f"measuring block group {gi + 1}/{len(groups)} ({option.label})", done, total)

        try:
            group_costs.append(
                measure_group(group, options, on_option=tick, flop_rate=config.flop_rate, op_level=op_level)
            )
        except RuntimeError as err:  # a block that cannot run on its own stays unplanned (glue)
            group_costs.append(None)
            notes.append(f"{group.path} is not planned: {err}")
    blocks.blocks = [b for b in blocks.blocks if group_costs[b.group] is not None]
    if not blocks.blocks:
        raise RuntimeError(f"no block of the model could be measured: {'; '.join(notes)}")
    planned = blocks.blocks
    chain = ChainCosts(
        [group_costs[b.group] for b in planned],  # type: ignore[misc]
        _later_grads(runner.model, planned),
        baseline_time,
        reads=record_reads(runner.model, runner.batch, planned) if segments else [],
        keep_tolerance=config.keep_tolerance,
    )
    verifier = Verifier(runner, planned)
    store_plan: Assignment = [STORE] * len(planned)
    frugal_plan: Assignment = [frugal_option(chain, i) for i in range(len(planned))]
    progress("measuring all blocks recomputed", done + 1, total)
    frugal_peak, _ = runner.measure(options_by_module(planned, frugal_plan), timed=False)
    chain.fit(store_plan, baseline_peak, frugal_plan, frugal_peak)
    model = ChainModel(chain, segments)
    # the least-keep assignment need not have the least peak (recomputing a head can raise it): also
    # measure the one the model predicts lowest, and keep whichever measures lower as the frugal plan
    lowest = model.least_solved(0.0, float(chain.peak(frugal_plan)))[1]
    if lowest is not None and lowest != frugal_plan:
        try:
            peak = verifier.peak(lowest)
        except Refused as refused:
            notes.append(segments_off_note(str(refused), runner))
            model = model.refusing(lowest, refused)
            lowest = model.least_solved(0.0, float(chain.peak(frugal_plan)))[1]
            peak = verifier.peak(lowest) if lowest is not None else frugal_peak
        if lowest is not None:
            model = model.learned(lowest, peak)
        if lowest is not None and peak < frugal_peak:
            frugal_plan, frugal_peak = lowest, peak
    measured = ChainMeasurement(
        blocks, model, baseline_peak, baseline_time, store_plan, frugal_plan, frugal_peak, verifier, notes
    )
    calibrate = config.calibrate_times if config.calibrate_times is not None else runner.on_accelerator
    if calibrate and config.flop_rate is None and not config.compiled:
        _calibrate_times(measured, runner)
    progress("measured", total, total)
    return measured


def _calibrate_times(measured: ChainMeasurement, runner: StepRunner) -> None:
    """Scale every option's extra time so that the model predicts the measured time of the frugal plan's
    step. Blocks are timed alone, each synchronized; on a GPU the step's kernels are queued back to back,
    so blocks timed alone over-predict the step; on a CPU they add up."""
    chain = measured.chain
    predicted = chain.time(measured.frugal_plan) - measured.baseline_time
    if predicted <= 0:
        return
    options = options_by_module(measured.blocks.blocks, measured.frugal_plan)
    _, seconds = runner.measure(options, tracked=False)
    if seconds <= measured.baseline_time:  # recomputing costs less than the timing noise: nothing to scale
        return
    scale = min(max((seconds - measured.baseline_time) / predicted, 0.1), 10.0)
    chain.time_scale = scale
    measured.notes.append(
        f"predicted extra times x{scale:.2f}: the plan recomputing the most measured "
        f"{seconds:.3g} s per step against {measured.baseline_time + predicted:.3g} s from blocks timed alone"
    )
