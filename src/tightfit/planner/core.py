"""``tightfit.plan``: one budget across recompute, few-bit, sketch (and offload on accelerators).

    plan = tightfit.plan(model, batch, "2GiB", allow=("recompute", "fewbit"))
    model = plan.apply_(model); print(plan)

How, reusing remat's parts: ``tightfit.remat.Planner`` measures the chain of blocks under every remat
option and fits the chain DP's constants (``tightfit.remat.chain``). For each group of identical blocks
and each allowed conversion (``Variant``: few-bit bits, sketch ratios, both) the group's representative
block is converted (``convert_`` restricted to it), measured under store with the same ruler
(``tightfit.remat.measure.measure_group``), its parameter gradients compared with store's (SQNR in dB)
and converted back. Variants under ``min_grad_sqnr`` or keeping no less than store are not offered. The
surviving ``Combined`` options join the group's remat options in a copy of ``ChainCosts``, and the
budget search (``tightfit.remat.search.BudgetSearch``) solves, applies (conversions, then the remat
executor), measures the peak with the ruler and re-solves as ``rematerialize`` does. Lossless plans are
gradient-checked (torch.equal to the unmodified model, dropout on); lossy ones record the whole model's
gradient SQNR.

NOTE [ Which remat options a conversion is measured with ]
  Effects do not add: under recompute a block keeps only its inputs, so a conversion changes nothing;
  under the save policies (matmul or projection outputs kept) the activation's input is a kept matmul
  output, so few-bit saves nothing either. A few-bit or sketch conversion is therefore measured stored
  and under the keep-these-ops options built from the CONVERTED block's own op sequence (which can keep
  the 2-bit codes and recompute the rest: ``tightfit.remat.measure.op_options``); offload is measured
  stored and under each save policy (what the policy keeps goes to the host). An option that an
  unconverted option dominates (keeps no more, no slower) is not offered. Per group: at most
  ``len(fewbit_bits) + len(sketch_ratios) + both`` lossy variants (3 with the defaults), each measured
  with 1 + ``OP_OPTIONS`` options; ``Plan.candidates`` counts every block option measured.

NOTE [ Side effects of planning ]
  Every measured step and every block measurement runs inside ``StepRunner.restoring``: parameters,
  buffers, gradients, optimizer state and every RNG are as they were afterwards, and every conversion is
  undone (``ConversionReport.undo``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from tightfit._step import LossFn
from tightfit.errors import InvalidInput, UserError
from tightfit.memory.distributed import check_unwrapped
from tightfit.planner.result import Plan, PlanDecision
from tightfit.planner.variants import Combined, Variant, converted, grad_sqnr
from tightfit.remat.auto import InfeasibleBudget as _RematInfeasible
from tightfit.remat.auto import Planner as RematPlanner
from tightfit.remat.auto import check_no_plan
from tightfit.remat.budget import Budget, parse_budget
from tightfit.remat.chain import ChainModel, Progress, frugal_option, options_by_module
from tightfit.remat.config import RematConfig
from tightfit.remat.execute import OpSequenceError
from tightfit.remat.measure import _differentiable, _Run, measure_group
from tightfit.remat.options import STORE, InSegment, Option, SavePolicy, Segment, Store
from tightfit.remat.search import BudgetSearch, Refused
from tightfit.remat.segments import SegmentError
from tightfit.remat.solvers.chain_costs import Assignment, ChainCosts
from tightfit.sizes import format_size

__all__ = [
    "TECHNIQUES",
    "DEFAULT_ALLOW",
    "LOSSY",
    "DEFAULT_MIN_GRAD_SQNR",
    "InfeasibleBudget",
    "Planner",
    "plan",
]

TECHNIQUES = ("recompute", "offload", "fewbit", "sketch")
LOSSY = ("fewbit", "sketch")
DEFAULT_ALLOW = ("recompute", "offload")  # lossless by default: gradients bit-identical to the model's
# few-bit at >= 2 bits: the fitted GELU/SiLU tables follow the derivative closely from 2 bits on
# (docs/fewbit.md); 1 bit is a step function
DEFAULT_FEWBIT_BITS = (2,)
# sketch keeps half the rows by default: the mildest setting of the paper, whose variance stays within
# minibatch noise on the models of docs/sketch.md; smaller ratios only when asked
DEFAULT_SKETCH_RATIOS = (0.5,)
# per lossy technique, the least SQNR (dB) of a block's parameter gradients against store's (the block alone
# on its recorded inputs, a Gaussian output gradient: a proxy for the loss's; docs/planner.md).
# few-bit: 10 dB (error energy <= 10% of the gradient's); 2-bit GELU/SiLU blocks of the zoo models measure
# 20-25 dB, and 1-bit tables fall below. sketch: 0 dB (error energy <= the gradient's own): a sketch is
# unbiased and sized against minibatch noise (docs/sketch.md), so one batch's gradient is a strict
# reference; at ratio 0.5 transformer blocks measure near 0 dB and a classifier head on few tokens below.
DEFAULT_MIN_GRAD_SQNR: dict[str, float] = {"fewbit": 10.0, "sketch": 0.0}
VARIANT_SEED = 1234  # the RNG seed of the block runs whose gradients are compared


@dataclasses.dataclass(frozen=True)
class PlanModel(ChainModel):
    """The planner's cost model: refusing an assignment (its gradients differ) turns segments off when it
    has any, and otherwise stops offering the options the refusal names, or every non-store option the
    assignment used (a lossless check cannot tell which block differed), so a refused assignment is never
    solved again."""

    def refusing(self, assignment: Sequence[Option], refused: Refused | None = None) -> PlanModel:
        if refused is not None and refused.options:
            return super().refusing(assignment, refused)  # type: ignore[return-value]
        if self.segments and any(isinstance(o, (Segment, InSegment)) for o in assignment):
            return dataclasses.replace(self, segments=False)
        return dataclasses.replace(self, chain=self.chain.without(assignment))


class InfeasibleBudget(_RematInfeasible):
    """No plan with the allowed techniques keeps the step under ``budget``; ``min_budget`` (bytes) is the
    measured peak of the most frugal plan with them, so ``tightfit.plan(..., budget=err.min_budget)``
    succeeds."""

    def __init__(self, budget: float, min_budget: float, allow: Sequence[str]) -> None:
        super().__init__(budget, min_budget, "plan")
        self.allow = tuple(allow)
        self.args = (
            f"no plan with allow={self.allow} keeps the training step under {format_size(budget)} "
            f"({int(budget)} bytes); the smallest feasible budget with these techniques is "
            f"{format_size(min_budget)} ({int(min_budget)} bytes, measured)",
        )


class InvalidAllow(UserError, ValueError):
    """``allow`` names no known technique, or is not a sequence of names."""


def check_allow(allow: Sequence[str] | str) -> tuple[str, ...]:
    """``allow`` as a tuple of technique names; ``InvalidAllow`` naming the valid ones otherwise."""
    if isinstance(allow, str):
        allow = tuple(a.strip() for a in allow.split(",") if a.strip())
    try:
        names = tuple(allow)
    except TypeError:
        raise InvalidAllow(
            f"allow must be a sequence of technique names from {TECHNIQUES}, got {allow!r}"
        ) from None
    bad = [a for a in names if a not in TECHNIQUES]
    if bad:
        raise InvalidAllow(f"unknown technique(s) {bad} in allow; valid: {', '.join(TECHNIQUES)}")
    return tuple(t for t in TECHNIQUES if t in names)


def check_floors(min_grad_sqnr: float | Mapping[str, float] | None) -> dict[str, float]:
    """Per lossy technique, the SQNR floor in dB: one number for all, a mapping overriding
    ``DEFAULT_MIN_GRAD_SQNR`` per technique, or None (the defaults)."""
    floors = dict(DEFAULT_MIN_GRAD_SQNR)
    if min_grad_sqnr is None:
        return floors
    if isinstance(min_grad_sqnr, Mapping):
        bad = [k for k in min_grad_sqnr if k not in LOSSY]
        if bad:
            raise UserError(
                f"min_grad_sqnr names {bad}; valid keys: {', '.join(LOSSY)} (the lossy techniques)"
            )
        given = dict(min_grad_sqnr)
    else:
        given = {t: min_grad_sqnr for t in LOSSY}
    for t, v in given.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise UserError(f"min_grad_sqnr for {t} is a number of dB, got {v!r}")
        floors[t] = float(v)
    return floors


def _positive(
    values: Sequence[Any], what: str, low: float, high: float, integer: bool = False
) -> tuple[Any, ...]:
    """``values`` checked: a non-empty sequence of numbers in [low, high] (integers when ``integer``);
    ``InvalidInput`` naming what is valid otherwise."""
    kind = "integers" if integer else "numbers"
    try:
        out = tuple(values)
    except TypeError:
        out = ()
    ok = numbers.Integral if integer else numbers.Real
    if not out or any(
        isinstance(v, bool) or not isinstance(v, ok) or not low <= v <= high for v in out  # type: ignore[operator]
    ):
        raise InvalidInput(
            f"{what} must be a non-empty sequence of {kind} in [{low}, {high}], got {values!r}"
        )
    return tuple(int(v) if integer else float(v) for v in out)


def _keeps(option: Option, kept: Option) -> bool:
    """Whether ``option`` runs the keep-ops option ``kept`` (alone or under a conversion)."""
    return option == kept or (isinstance(option, Combined) and option.base == kept)


def _block_grads(group: Any) -> list[torch.Tensor | None]:
    """Parameter gradients (input gradients for a block without parameters) of one store forward and
    backward of ``group``'s block on its recorded arguments, under a fixed seed."""
    run = _Run(group, STORE, VARIANT_SEED)
    for p in run.params:
        p.grad = None
    out = run.fwd()
    outs = _differentiable(out)
    if outs:
        torch.autograd.backward(outs, run.grad_outputs(outs))
    grads = [p.grad for p in run.params] if run.params else [x.grad for x in run.inputs()]
    for p in run.params:
        p.grad = None
    return grads


@contextlib.contextmanager
def no_cache(model: torch.nn.Module) -> Iterator[None]:
    """A Hugging Face model's ``config.use_cache`` off for the duration (a recomputed block would append to
    its KV cache twice), as it was afterwards."""
    config = getattr(model, "config", None)
    before = getattr(config, "use_cache", None)
    if before:
        config.use_cache = False  # type: ignore[union-attr]
    try:
        yield
    finally:
        if before:
            config.use_cache = before  # type: ignore[union-attr]


class Planner:
    """Measure a model once for the techniques in ``allow``, then plan for any number of budgets
    (``plan``; each a query that leaves the measurements as they were)."""

    def __init__(
        self,
        model: torch.nn.Module,
        batch: Any,
        *,
        allow: Sequence[str] | str = DEFAULT_ALLOW,
        loss_fn: LossFn | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        min_grad_sqnr: float | Mapping[str, float] | None = None,
        fewbit_bits: Sequence[int] = DEFAULT_FEWBIT_BITS,
        sketch_ratios: Sequence[float] = DEFAULT_SKETCH_RATIOS,
        config: RematConfig | None = None,
        progress: Progress | None = None,
        offload_target: Any = None,
    ) -> None:
        started = time.perf_counter()
        self.allow = check_allow(allow)
        self.min_grad_sqnr = check_floors(min_grad_sqnr)
        self.fewbit_bits = _positive(fewbit_bits, "fewbit_bits", 1, 8, integer=True)
        self.sketch_ratios = _positive(sketch_ratios, "sketch_ratios", 1e-6, 1.0)
        self.model, self.batch = model, batch
        self.offload_target = offload_target
        with no_cache(model):
            self._measure_all(loss_fn, optimizer, config, progress)
        self.measure_time = time.perf_counter() - started

    def _measure_all(
        self,
        loss_fn: LossFn | None,
        optimizer: torch.optim.Optimizer | None,
        config: RematConfig | None,
        progress: Progress | None,
    ) -> None:
        model, batch = self.model, self.batch
        self.remat = RematPlanner(model, batch, loss_fn, optimizer, config, progress=progress)
        self.runner = self.remat.runner
        m = self.remat.measured
        self.notes: list[str] = list(m.notes)
        self.blocks = m.blocks.blocks
        self.recompute = "recompute" in self.allow
        self.variant_table: list[tuple[str, str, str, int, float]] = []  # group, variant, status, keep, sqnr
        self.sqnr: dict[tuple[int, Option], float] = {}  # (group, option) -> measured block SQNR
        self.candidates = sum(len(c) for c in {id(c): c for c in m.chain.costs}.values())
        self.check = "check"  # how lossless steps are checked ("check": torch.equal; None: not checked)
        with self.runner.restoring():
            self.runner.measure(None, timed=False, tracked=False, grads="capture")
            try:  # the unmodified step twice: a lossless check needs reproducible gradients
                self.runner.measure(None, timed=False, tracked=False, grads="check")
            except SegmentError:
                self.check = None
                self.notes.append(
                    "gradients not checked: two unmodified steps under one seed gave different gradients "
                    "(non-deterministic kernels; torch.use_deterministic_algorithms(True) makes them "
                    "reproducible and the check meaningful)"
                )
            extra = self._measure_variants()
        if "offload" in self.allow and not self.offloadable:
            self.notes.append(
                "offload not offered: the model is not on an accelerator (host memory is the same memory)"
            )
        # the chain DP over the allowed remat options plus the measured conversions
        per_group: dict[int, dict[Option, Any]] = {}
        costs = []
        for i, b in enumerate(self.blocks):
            if b.group not in per_group:
                own = {o: c for o, c in m.chain.costs[i].items() if self.recompute or isinstance(o, Store)}
                own.update(extra.get(b.group, {}))
                per_group[b.group] = own
            costs.append(per_group[b.group])
        chain = m.chain.with_costs(costs)
        self.chain: ChainCosts = chain
        self.cost_model = PlanModel(chain, self.recompute and m.model.segments)
        self.baseline_peak, self.baseline_time = m.baseline_peak, m.baseline_time
        self.store_plan: Assignment = list(m.store_plan)
        self.measured_peaks: dict[tuple[Option, ...], int] = {tuple(self.store_plan): m.baseline_peak}
        self.lossy_grads: dict[tuple[Option, ...], float] = {}
        self.lossy_sqnr: dict[tuple[Option, ...], dict[str, float]] = {}  # per technique
        self.min_budget, self.frugal_plan = self._frugal()

    # -- measuring ------------------------------------------------------------------------------------
    @property
    def offloadable(self) -> bool:
        """Whether offload options are measured: allowed, and an accelerator (or a given target)."""
        if "offload" not in self.allow:
            return False
        if self.offload_target is not None:
            return True
        if not self.runner.on_accelerator:
            return False
        from tightfit.offload import available  # only on accelerators

        return available(next(self.model.parameters()).device)

    def _variants(self) -> list[Variant]:
        bits = self.fewbit_bits if "fewbit" in self.allow else ()
        ratios = self.sketch_ratios if "sketch" in self.allow else ()
        out = [Variant(fewbit=b) for b in bits] + [Variant(sketch=r) for r in ratios]
        out += [Variant(fewbit=b, sketch=r) for b in bits for r in ratios]
        return out + ([Variant(offload=True)] if self.offloadable else [])

    def _measure_variants(self) -> dict[int, dict[Option, Any]]:
        """Costs of every allowed conversion of every group's block, measured under store (NOTE [ Which
        remat options a conversion is measured with ]); those under the SQNR floor or saving nothing are
        left out (recorded in ``variant_table``)."""
        variants = self._variants()
        out: dict[int, dict[Option, Any]] = {}
        if not variants:
            return out
        m = self.remat.measured
        calls: dict[str, int] = {}
        for b in self.blocks:
            calls[b.path] = calls.get(b.path, 0) + 1
        planned = {b.group for b in self.blocks}
        for gi, group in enumerate(m.blocks.groups):
            if gi not in planned:
                continue
            if calls.get(group.path, 1) > 1:
                self.notes.append(
                    f"{group.path}: conversions not offered (the module runs several times a step)"
                )
                continue
            reference = _block_grads(group)
            useful: dict[str, int] = {}  # single techniques that saved memory on this group
            first = next(i for i, b in enumerate(self.blocks) if b.group == gi)
            keeps = {o: c.keep for o, c in m.chain.costs[first].items() if c.exact}  # the remat options'

            for variant in variants:
                if len(variant.techniques) > 1 and not all(t in useful for t in variant.techniques):
                    continue  # a combination only when each part alone saved memory (dominance pruning)
                # offload also moves what a save policy keeps; few-bit and sketch are measured under store
                # and their own op-level options (NOTE [ Which remat options a conversion is measured with ])
                bases, op_level = [STORE], False
                if self.recompute and variant.offload:  # what each save policy keeps, offloaded
                    bases += [o for o in keeps if isinstance(o, SavePolicy)]
                elif self.recompute:  # the converted block's own keep-these-ops options
                    op_level = self.remat.config.planned_op_level
                try:
                    with converted(self.model, {variant: [group.path]}, self.offload_target) as n:
                        if n == 0:
                            continue
                        here = dataclasses.replace(group, module=self.model.get_submodule(group.path))
                        costs = measure_group(here, bases, op_level=op_level)
                        sqnr = grad_sqnr(reference, _block_grads(here))
                except Exception as err:  # a conversion this block cannot run: not offered, planning goes on
                    self.notes.append(f"{group.path}: {variant.key} not offered: {type(err).__name__}: {err}")
                    continue
                for base, cost in costs.items():
                    self.candidates += 1
                    status = "offered"
                    floor = self.floor(variant) if variant.lossy else math.inf
                    if sqnr < floor:
                        status = (
                            f"not offered: SQNR under {floor:g} dB"
                            if variant.lossy
                            else "not offered: gradients differ from store's"
                        )
                    elif not cost.exact and cost.keep == cost.fwd_peak == cost.bwd_peak == 0:
                        status = "not offered: the converted block raises when run under it"
                    elif not cost.exact:
                        status = "not offered: its gradients differ from the converted block's store"
                    elif cost.keep >= keeps.get(base, keeps[STORE]):
                        status = f"not offered: keeps no less than {base.label} unconverted"
                    elif (rival := self._dominating(first, cost)) is not None:
                        status = f"not offered: {rival.label} keeps no more and is no slower"
                    else:
                        for t in variant.techniques:
                            useful[t] = cost.keep
                        option = Combined(base, variant)
                        out.setdefault(gi, {})[option] = dataclasses.replace(
                            cost, option=option, may_save_time=variant.lossy
                        )
                        if variant.lossy:
                            self.sqnr[(gi, option)] = sqnr
                    label = Combined(base, variant).label
                    self.variant_table.append((group.path, label, status, cost.keep, sqnr))
        return out

    def _dominating(self, block: int, cost: Any) -> Option | None:
        """An allowed, exact unconverted option of ``block`` keeping no more than ``cost`` and no slower
        (then the conversion buys nothing there), or None."""
        seconds = cost.fwd_time + cost.bwd_time
        for option, c in self.remat.measured.chain.costs[block].items():
            allowed = self.recompute or isinstance(option, Store)
            if allowed and c.exact and c.keep <= cost.keep and c.fwd_time + c.bwd_time <= seconds:
                return option
        return None

    def floor(self, variant: Variant) -> float:
        """The SQNR floor of a variant: the highest of its techniques' floors."""
        return max(self.min_grad_sqnr[t] for t in variant.techniques)

    def _lossy(self, assignment: Sequence[Option]) -> bool:
        return any(isinstance(o, Combined) and o.variant.lossy for o in assignment)

    def measure(self, assignment: Sequence[Option], *, timed: bool = False) -> tuple[int, float]:
        """(peak, seconds) of one step with ``assignment`` applied (conversions, then remat). Lossless
        assignments are gradient-checked (``Refused`` when they differ). Lossy ones get their SQNR per
        technique (the gradients of the parameters of the blocks each converts, against the unmodified
        model's), refused with the options of a technique under its floor; their segments, if any, are
        checked alone (the assignment without its conversions)."""
        lossy = self._lossy(assignment)
        by_variant: dict[Variant, list[str]] = {}
        for b, o in zip(self.blocks, assignment):
            if isinstance(o, Combined):
                by_variant.setdefault(o.variant, []).append(b.path)
        bases = [o.base if isinstance(o, Combined) else o for o in assignment]
        if lossy and self.check and any(isinstance(o, (Segment, InSegment)) for o in bases):
            self._step(bases, {}, timed=False, grads=self.check)  # the lossless part, checked alone
        peak, seconds = self._step(bases, by_variant, timed=timed, grads="keep" if lossy else self.check)
        if lossy:
            assert self.runner.reference_grads is not None and self.runner.last_grads is not None
            reference, grads = self.runner.reference_grads, self.runner.last_grads
            self.lossy_grads[tuple(assignment)] = grad_sqnr(reference, grads)
            per = self.technique_sqnr(assignment, reference, grads)
            self.lossy_sqnr[tuple(assignment)] = per
            under = [t for t, db in per.items() if db < self.min_grad_sqnr[t]]
            if under:
                floors = self.min_grad_sqnr
                why = ", ".join(f"{t} blocks' gradients {per[t]:.1f} dB (floor {floors[t]:g})" for t in under)
                lossy_of = [o for o in assignment if isinstance(o, Combined)]
                raise Refused(why, [o for o in lossy_of if set(o.variant.techniques) & set(under)])
        return peak, seconds

    def _step(
        self, bases: Sequence[Option], by_variant: dict[Variant, list[str]], *, timed: bool, grads: str | None
    ) -> tuple[int, float]:
        with (
            no_cache(self.model),
            self.runner.restoring(),
            converted(self.model, by_variant, self.offload_target),
        ):
            try:
                return self.runner.measure(options_by_module(self.blocks, bases), timed=timed, grads=grads)
            except SegmentError as err:  # gradients differ from the unmodified model's
                raise Refused(str(err)) from err
            except OpSequenceError as err:  # a block ran other ops than its keep-ops option measured
                raise Refused(str(err), [o for o in self.chain_options() if _keeps(o, err.option)]) from err

    def chain_options(self) -> set[Option]:
        return {o for costs in self.chain.costs for o in costs}

    def technique_sqnr(
        self,
        assignment: Sequence[Option],
        reference: Sequence[torch.Tensor | None],
        grads: Sequence[torch.Tensor | None],
    ) -> dict[str, float]:
        """Per lossy technique of ``assignment``, the SQNR (dB) of the gradients of the parameters of the
        blocks it converts, against ``reference`` (the unmodified model's, same seed)."""
        index = {id(p): i for i, p in enumerate(self.model.parameters())}
        params: dict[str, set[int]] = {}
        for b, o in zip(self.blocks, assignment):
            if isinstance(o, Combined):
                for t in o.variant.techniques:
                    if t in LOSSY:
                        mine = params.setdefault(t, set())
                        mine.update(index[id(p)] for p in self.model.get_submodule(b.path).parameters())
        return {
            t: grad_sqnr([reference[i] for i in sorted(ix)], [grads[i] for i in sorted(ix)])
            for t, ix in params.items()
        }

    def _peak(self, assignment: Sequence[Option]) -> int:
        key = tuple(assignment)
        if key not in self.measured_peaks:
            self.measured_peaks[key] = self.measure(assignment)[0]
        return self.measured_peaks[key]

    def _frugal(self) -> tuple[int, Assignment]:
        """(measured peak, assignment) of the most frugal plan with the allowed techniques: the least-keep
        exact option per block, and the assignment the model predicts lowest, whichever measures lower."""
        chain = self.chain
        frugal = [frugal_option(chain, i) for i in range(len(self.blocks))]
        try:
            best_peak, best = self._peak(frugal), frugal
        except Refused as refused:  # the least-keep conversions or options fail their check
            self.notes.append(f"the least-keep options of every block together were refused: {refused}")
            self.cost_model = self.cost_model.refusing(frugal, refused)
            best_peak, best = self.baseline_peak, self.store_plan
        if self.recompute and self.remat.frugal_peak < best_peak:
            try:  # measured by remat without a gradient check: checked here
                best_peak, best = self._peak(self.remat.frugal_plan), self.remat.frugal_plan
            except Refused as refused:
                self.notes.append(f"the most frugal recompute plan was refused: {refused}")
                self.cost_model = self.cost_model.refusing(self.remat.frugal_plan, refused)
        lowest = self.cost_model.least_solved(0.0, float(chain.peak(frugal)))[1]
        if lowest is not None and tuple(lowest) not in (tuple(best), tuple(frugal)):
            try:
                peak = self._peak(lowest)
            except Refused as refused:
                peak = None
                self.cost_model = self.cost_model.refusing(lowest, refused)
            if peak is not None and peak < best_peak:
                best_peak, best = peak, lowest
        return min(best_peak, self.baseline_peak), (
            best if best_peak <= self.baseline_peak else self.store_plan
        )

    # -- planning -------------------------------------------------------------------------------------
    def budget_for_overhead(self, ratio: float) -> int:
        """The smallest budget whose plan the model predicts within ``ratio`` times the unmodified step."""
        if not ratio >= 1.0:
            raise ValueError(f"ratio is a step-time ratio to the unmodified model, >= 1; got {ratio!r}")
        limit = ratio * self.chain.time(self.store_plan)
        least, found = self.cost_model.least_solved(
            float(self.min_budget), float(self.baseline_peak), lambda a: self.chain.time(a) <= limit
        )
        return int(least) if found is not None else int(self.baseline_peak)

    def resolve_budget(self, budget: int | float | str | Budget) -> int:
        return parse_budget(budget).resolve(self.min_budget, self.budget_for_overhead)

    def _decisions(self, assignment: Sequence[Option]) -> list[PlanDecision]:
        out = []
        for i, (b, o) in enumerate(zip(self.blocks, assignment)):
            sqnr = self.sqnr.get((b.group, o)) if isinstance(o, Combined) else None
            out.append(
                PlanDecision(
                    b.name,
                    b.path,
                    b.call,
                    b.group,
                    o,
                    self.chain.keep(i, o),
                    self.chain.extra_time(i, o),
                    sqnr,
                )
            )
        return out

    def plan(self, budget: int | float | str | Budget, *, max_rounds: int = 4) -> Plan:
        """The fastest plan with the allowed techniques whose measured peak is <= ``budget`` (bytes, a size,
        "min" or "x1.2"); raises ``InfeasibleBudget`` naming the smallest feasible budget."""
        started = time.perf_counter()
        budget = self.resolve_budget(budget)
        if budget < self.min_budget:
            raise InfeasibleBudget(budget, self.min_budget, self.allow)
        notes = list(self.notes)
        search: BudgetSearch[Assignment] | None = None
        if budget >= self.baseline_peak:
            assignment, measured = self.store_plan, self.baseline_peak
            notes.append("the model fits as it is: nothing applied")
        else:
            search = BudgetSearch(self.cost_model, self._peak, dict(self.measured_peaks))
            found = search.run(budget, float(self.chain.peak(self.frugal_plan)), max_rounds)
            if found.candidate is not None:
                found = search.probe(budget, found, 0.02 * self.baseline_time)
            if found.candidate is None:
                assignment, measured = self.frugal_plan, self.min_budget
                notes.append(
                    "no solved plan measured under the budget; using the plan of least measured peak"
                )
            else:
                assignment, measured = found.candidate, found.measured  # type: ignore[assignment]
            self.measured_peaks.update(search.measured)
        cost_model = search.model if search is not None else self.cost_model
        plan = Plan(
            budget=budget,
            decisions=self._decisions(assignment),
            peak=cost_model.peak(assignment),
            time=cost_model.time(assignment),
            allow=self.allow,
            min_grad_sqnr=self.min_grad_sqnr,
            measured_peak=measured,
            baseline_peak=self.baseline_peak,
            baseline_time=self.baseline_time,
            min_budget=self.min_budget,
            candidates=self.candidates,
            source=self.remat.measured.blocks.source,
            notes=notes,
            iterations=0 if search is None else len(search.trials),
            trials=[] if search is None else [t.to_dict() for t in search.trials],
        )
        verify_started = time.perf_counter()
        if tuple(assignment) == tuple(self.store_plan):
            plan.measured_time, plan.grads_equal = self.baseline_time, True
        else:
            try:
                _, plan.measured_time = self.measure(assignment, timed=True)
            except Refused as refused:  # it passed when searched: the step is not reproducible
                raise UserError(
                    f"the chosen plan passed its gradient check once and failed it when measured again "
                    f"({refused}): this model's training step is not reproducible under one seed; call "
                    "torch.use_deterministic_algorithms(True) before planning"
                ) from refused
            if plan.lossless:
                plan.grads_equal = True if self.check else None  # measure() raised when they differ
            else:
                plan.grads_equal = False
                plan.grad_sqnr = self.lossy_grads.get(tuple(assignment))
        for path, key, status, keep, sqnr in self.variant_table:
            if status != "offered":
                plan.notes.append(f"{path}: {key} {status} (keeps {format_size(keep)}, SQNR {sqnr:.1f} dB)")
        plan.verify_time = time.perf_counter() - verify_started
        plan.measure_time = self.measure_time
        plan.planning_time = self.measure_time + time.perf_counter() - started
        return plan


def plan(
    model: torch.nn.Module,
    batch: Any,
    budget: int | float | str,
    *,
    allow: Sequence[str] | str = DEFAULT_ALLOW,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    min_grad_sqnr: float | Mapping[str, float] | None = None,
    fewbit_bits: Sequence[int] = DEFAULT_FEWBIT_BITS,
    sketch_ratios: Sequence[float] = DEFAULT_SKETCH_RATIOS,
    config: RematConfig | None = None,
    progress: Progress | None = None,
) -> Plan:
    """The fastest way to train ``model`` on batches like ``batch`` within ``budget``, across the
    techniques in ``allow``; ``plan.apply_(model)`` applies it and returns the model to train.

    ``budget``: the absolute live-tensor peak of one training step (bytes or "2GiB"), "min" (the smallest
    feasible with ``allow``) or "x1.2" (the least memory predicted within 1.2 times the unmodified step).
    ``allow``: technique names from ``TECHNIQUES``. The default ("recompute", "offload") is lossless:
    gradients are torch.equal to the unmodified model's, dropout included. "fewbit" and "sketch" are lossy
    and only used when named; each block's converted gradients are measured against store's (SQNR in dB)
    and options under ``min_grad_sqnr`` (dB: one number, or per technique; default
    ``DEFAULT_MIN_GRAD_SQNR``) are not offered. ``fewbit_bits`` / ``sketch_ratios``: the
    conversions tried. Offload is offered on accelerators only. ``config``: how remat measures
    (``RematConfig``). Planning leaves the model, optimizer, gradients and RNGs as they were, and prints
    nothing. Raises ``InfeasibleBudget`` (with ``min_budget``) when no plan fits, ``UserError`` for an
    unknown technique name.
    """
    check_unwrapped(model, "tightfit.plan")
    check_no_plan(model)
    parsed = parse_budget(budget)  # refused before anything is measured
    planner = Planner(  # checks allow, min_grad_sqnr, fewbit_bits and sketch_ratios before measuring
        model,
        batch,
        allow=allow,
        loss_fn=loss_fn,
        optimizer=optimizer,
        min_grad_sqnr=min_grad_sqnr,
        fewbit_bits=fewbit_bits,
        sketch_ratios=sketch_ratios,
        config=config,
        progress=progress,
    )
    return planner.plan(parsed)
