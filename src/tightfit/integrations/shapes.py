"""Plans per batch shape: one budget kept for batches of every shape (dynamic padding, bucketing).

A plan is measured on one batch. ``ShapePlans.prepare(batch)`` makes sure a plan made for a batch at least
as large runs the step:

- a batch *covered* by a planned shape (same tensors, same ranks, every dimension <= the planned one) runs
  the plan of the smallest covering shape (switching plans only re-patches forwards, nothing is measured);
- a batch larger than every planned shape in some dimension is planned on demand
  (``on_new_shape="replan"``, the default), or gets a warning once per shape and keeps the current plan
  (``"warn"``), or raises ``UserError`` (``"error"``). Never a silent step over budget.

NOTE [ Why a plan is safe for smaller shapes ]
  A plan fixes which block calls recompute (and, with the planner, which are compressed or offloaded).
  Running the same decisions on a batch whose every tensor dimension is no larger makes every tensor of the
  step no larger, parameters, gradients and optimizer state unchanged, so the peak is no larger. Two things
  could break that and are not modelled: kernels choosing another algorithm (with another workspace) for
  another shape, and models whose memory is not monotone in the input (data-dependent control flow). The
  integration tests run every smaller shape under the larger one's plan with the ruler.

NOTE [ Budget and gradient accumulation ]
  The budget is the ruler's live-tensor peak of one training step (``tightfit.rematerialize``). A plan is
  measured from gradients set to None; a step accumulating into existing gradients (the second
  micro-batch of gradient accumulation) holds every gradient from its start. ``reserve`` bytes are taken
  off the budget when planning; the integrations reserve the trainable parameters' gradient bytes when
  accumulating, which covers that difference.

The one place where the planning technique is chosen is ``make_plan``: recompute-only plans go through
``tightfit.remat.Planner`` (lossless); an ``allow`` naming another technique goes to ``tightfit.plan`` (the
one-budget planner) when it is importable, and otherwise converts the whole model with the allowed lossy
techniques (``FewBit``, ``Sketch``) once before planning recomputation on top.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tightfit._step import LossFn
from tightfit.errors import UserError
from tightfit.remat import execute
from tightfit.remat.auto import Planner
from tightfit.remat.budget import parse_budget
from tightfit.remat.config import RematConfig
from tightfit.remat.plan import Plan
from tightfit.sizes import format_size

__all__ = ["TECHNIQUES", "ShapeKey", "ShapePlans", "covers", "make_plan", "shape_key"]

TECHNIQUES = ("recompute", "fewbit", "sketch", "offload")
ShapeKey = tuple[tuple[str, tuple[int, ...]], ...]
ON_NEW_SHAPE = ("replan", "warn", "error")


def shape_key(batch: Any, prefix: str = "") -> ShapeKey:
    """(name, shape) of every tensor in a batch (a tensor, tuples/lists, mappings: keys sorted)."""
    if isinstance(batch, torch.Tensor):
        return ((prefix, tuple(batch.shape)),)
    out: list[tuple[str, tuple[int, ...]]] = []
    if isinstance(batch, Mapping):
        for k in sorted(batch, key=str):
            out.extend(shape_key(batch[k], f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(batch, (tuple, list)):
        for i, v in enumerate(batch):
            out.extend(shape_key(v, f"{prefix}.{i}" if prefix else str(i)))
    return tuple(out)


def covers(planned: ShapeKey, batch: ShapeKey) -> bool:
    """Whether a plan made for shape ``planned`` is safe for ``batch`` (same tensors and ranks, every
    dimension no larger)."""
    if len(planned) != len(batch):
        return False
    for (n1, s1), (n2, s2) in zip(planned, batch):
        if n1 != n2 or len(s1) != len(s2) or any(b > a for a, b in zip(s1, s2)):
            return False
    return True


def _numel(key: ShapeKey) -> int:
    total = 0
    for _, shape in key:
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def _describe(key: ShapeKey) -> str:
    return ", ".join(f"{n or 'batch'}{list(s)}" for n, s in key) or "no tensors"


def check_allow(allow: str | Sequence[str]) -> tuple[str, ...]:
    """``allow`` as a tuple of technique names; a clear error naming the valid ones otherwise."""
    if isinstance(allow, str):
        allow = tuple(a.strip() for a in allow.split(",") if a.strip())
    allow = tuple(allow)
    bad = [a for a in allow if a not in TECHNIQUES]
    if bad or not allow:
        raise UserError(f"allow must name techniques among {', '.join(TECHNIQUES)}; got {list(allow)!r}")
    return allow


def _planner_plan() -> Callable[..., Any] | None:
    """``tightfit.plan`` (the one-budget planner) when it is importable, else None."""
    try:
        module = importlib.import_module("tightfit.planner")
    except ImportError:
        return None
    fn = getattr(module, "plan", None)
    return fn if callable(fn) else None


def make_plan(
    model: torch.nn.Module,
    batch: Any,
    budget: int | str,
    *,
    allow: Sequence[str] = ("recompute",),
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    config: RematConfig | None = None,
) -> Any:
    """Plan ``model`` for ``budget`` (bytes, "min" or "x1.2") on ``batch``: the one switch between techniques.

    Recompute only: ``tightfit.remat.Planner`` (gradients bit-identical). Any other technique in ``allow``:
    ``tightfit.plan`` when the planner is importable (its plan is returned); without it, recomputation is
    planned here and the caller converts the lossy techniques itself (``ShapePlans``).
    """
    if set(allow) - {"recompute"}:  # the one line to change to route recompute-only plans to the planner too
        planner = _planner_plan()
        if planner is not None:
            return planner(
                model, batch, budget, allow=tuple(allow), loss_fn=loss_fn, optimizer=optimizer, config=config
            )
    return Planner(model, batch, loss_fn, optimizer, config).plan(budget)


def uses_planner(allow: Sequence[str]) -> bool:
    """Whether ``make_plan`` hands ``allow`` to ``tightfit.plan``."""
    return bool(set(allow) - {"recompute"}) and _planner_plan() is not None


def apply_plan(model: torch.nn.Module, plan: Any) -> None:
    """Patch ``model`` to run ``plan`` (a remat ``Plan``, or a planner plan with ``apply_``)."""
    if isinstance(plan, Plan):
        execute.apply(model, plan.options, compile_budget=plan.compile_budget)
        model.__dict__["plan"] = plan
    else:
        plan.apply_(model)


def remove_plan(model: torch.nn.Module) -> None:
    """Remove whatever plan ``apply_plan`` applied (a planner plan's conversions included)."""
    plan = model.__dict__.get("plan")
    undo = getattr(type(plan), "undo_", None) if plan is not None and not isinstance(plan, Plan) else None
    if undo is not None:
        undo(model)
    else:
        execute.undo(model)
    model.__dict__.pop("plan", None)


def _plan_to_dict(plan: Any) -> dict[str, Any] | None:
    if isinstance(plan, Plan):
        return {"kind": "remat", "plan": plan.to_dict()}
    to_dict = getattr(plan, "to_dict", None)
    if to_dict is None:
        return None
    return {"kind": f"{type(plan).__module__}.{type(plan).__qualname__}", "plan": to_dict()}


def _plan_from_dict(data: Mapping[str, Any]) -> Any:
    if data["kind"] == "remat":
        return Plan.from_dict(data["plan"])
    module, _, name = data["kind"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls.from_dict(data["plan"])


@dataclass
class ShapePlan:
    """One plan and the batch shape it was measured on."""

    key: ShapeKey
    plan: Any
    loaded: bool = False  # read from a saved file, not measured in this process


class ShapePlans:
    """Plans for ``model`` under one ``budget`` across batch shapes (see the module docstring).

    ``budget``: bytes or a size ("6GiB"), or a form each plan resolves on its own shape: "min" (the
    smallest feasible peak) or "x1.2" (the least memory predicted within 1.2 times the unplanned step).

    ``allow``: techniques the plans may use (``"recompute"`` only: lossless, gradients bit-identical).
    ``loss_fn(output) -> scalar`` when the output holds no loss; ``optimizer`` makes the budget count its
    state and step; ``config`` (``RematConfig``) says how recomputation is planned; ``reserve`` bytes are
    kept out of the budget (NOTE [ Budget and gradient accumulation ]).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        budget: int | float | str,
        *,
        allow: str | Sequence[str] = ("recompute",),
        loss_fn: LossFn | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        config: RematConfig | None = None,
        on_new_shape: str = "replan",
        reserve: int = 0,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if on_new_shape not in ON_NEW_SHAPE:
            raise UserError(f"on_new_shape must be one of {ON_NEW_SHAPE}, got {on_new_shape!r}")
        self.model = model
        self.budget_form = parse_budget(budget)  # a size, "min" or "x1.2" (tightfit.remat.budget)
        self.budget: int | None = self.budget_form.nbytes  # None for "min"/"x1.2": resolved per plan
        self.allow = check_allow(allow)
        if "offload" in self.allow and not uses_planner(self.allow):
            raise UserError(
                "allow='offload' needs the one-budget planner (tightfit.plan), which is not available in "
                "this build; allow recompute, fewbit or sketch"
            )
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        # a batch of the planned shape taking another op path (transformers drops an attention mask that
        # is all ones) runs its keep-ops blocks under recompute (tightfit.remat.execute, NOTE [ Keep-ops
        # on another op sequence ])
        self.config = config if config is not None else RematConfig()
        self.on_new_shape = on_new_shape
        self.reserve = int(reserve)
        if self.budget is None:
            self.reserve = 0  # a relative budget is resolved by each plan; nothing to reserve from
        elif self.reserve >= self.budget:
            raise UserError(
                f"the budget {format_size(self.budget)} leaves nothing once {format_size(self.reserve)} "
                "are reserved (gradients accumulated across micro-batches)"
            )
        self.plans: list[ShapePlan] = []
        self.active: ShapePlan | None = None
        self.planned = 0  # plans measured in this process
        self.conversions: list[Any] = []  # ConversionReports of lossy techniques applied to the whole model
        self.notes: list[str] = []
        self._warned: set[ShapeKey] = set()
        self._converted = False  # lossy whole-model conversions done (without the planner)
        self._trained = False  # the root's train mode checked (switched on once if it was off)
        self._fingerprint: str | None = None

    @property
    def plan_budget(self) -> int | str:
        """The budget plans are made for: ``budget - reserve``, or the relative form ("min", "x1.2")."""
        return str(self.budget_form) if self.budget is None else self.budget - self.reserve

    def _budget_text(self) -> str:
        return str(self.budget_form) if self.budget is None else format_size(self.budget)

    def covering(self, key: ShapeKey) -> ShapePlan | None:
        """The plan of the smallest planned shape covering ``key``, or None."""
        found = [p for p in self.plans if covers(p.key, key)]
        return min(found, key=lambda p: _numel(p.key)) if found else None

    def prepare(self, batch: Any) -> bool:
        """Make the model run a plan safe for ``batch``; returns True when a plan was measured now.

        A root in eval mode at the first call (a model fresh from ``from_pretrained``) is switched to
        train mode, once; a root already in train mode is left as it is, so submodules kept in eval mode
        (a frozen batch norm, a disabled dropout) stay so."""
        key = shape_key(batch)
        self.fingerprint()  # taken before any conversion or plan changes the model
        if not self._trained:
            self._trained = True
            if not self.model.training:
                self.model.train()
        if not self._converted:
            self._note_frozen()
            if not uses_planner(self.allow):
                self._convert_lossy(batch)
            self._converted = True  # after success: a failed conversion is retried (and undone) next call
        chosen = self.covering(key)
        measured = False
        if chosen is None:
            if self.plans and self.on_new_shape == "error":
                raise UserError(
                    f"batch shape ({_describe(key)}) is larger than every planned shape "
                    f"({'; '.join(_describe(p.key) for p in self.plans)}); plan for it (on_new_shape="
                    "'replan') or bound the batch shape (e.g. pad to a maximum length)"
                )
            if self.plans and self.on_new_shape == "warn":
                if key not in self._warned:
                    self._warned.add(key)
                    warnings.warn(
                        f"tightfit: batch shape ({_describe(key)}) was not planned for; the step runs the "
                        f"plan of a smaller shape and may exceed the budget {self._budget_text()}",
                        stacklevel=2,
                    )
                return False
            chosen = ShapePlan(key, self._measure(batch))
            self.plans.append(chosen)
            self.planned += 1
            measured = True
        if chosen is not self.active:
            apply_plan(self.model, chosen.plan)
            self.active = chosen
        return measured

    def _measure(self, batch: Any) -> Any:
        remove_plan(self.model)
        self.active = None
        modes = [(m, m.training) for m in self.model.modules()]  # planning leaves every mode as it was
        try:
            return make_plan(
                self.model,
                batch,
                self.plan_budget,
                allow=self.allow,
                loss_fn=self.loss_fn,
                optimizer=self.optimizer,
                config=self.config,
            )
        finally:
            for m, training in modes:
                m.training = training

    def _note_frozen(self) -> None:
        """Say how many linear layers are frozen (LoRA base layers): they keep no input for a gradient."""
        linear = [m for m in self.model.modules() if isinstance(m, torch.nn.Linear)]
        frozen = [m for m in linear if not m.weight.requires_grad]
        if frozen:
            self.notes.append(
                f"{len(frozen)} of {len(linear)} linear layers are frozen (requires_grad=False, e.g. LoRA "
                "base layers): autograd keeps no input for their weight gradients; what the step keeps is "
                "for the gradient that reaches trainable layers"
            )

    def _convert_lossy(self, batch: Any) -> None:
        """Without the planner: the allowed lossy techniques convert the whole model, once."""
        from tightfit.convert import convert_
        from tightfit.fewbit.config import FewBit
        from tightfit.sketch.config import Sketch

        try:
            if "fewbit" in self.allow:
                self.conversions.append(convert_(self.model, FewBit()))
            if "sketch" in self.allow:
                self.conversions.append(convert_(self.model, Sketch(), example=batch, loss_fn=self.loss_fn))
        except BaseException:
            for report in reversed(self.conversions):  # nothing left half-converted
                report.undo()
            self.conversions = []
            raise
        if self.conversions:
            self.notes.append(
                "the one-budget planner is not available: the allowed lossy techniques convert the whole "
                "model; recomputation is planned on top"
            )

    # -- reporting and persistence --------------------------------------------------------------------
    def __str__(self) -> str:
        lines = [
            f"tightfit plans for budget {self._budget_text()} (allow {', '.join(self.allow)}"
            + (f"; {format_size(self.reserve)} reserved" if self.reserve else "")
            + f"): {len(self.plans)} shape(s)"
        ]
        for p in self.plans:
            mark = " (active)" if p is self.active else ""
            source = "loaded" if p.loaded else "measured"
            lines.append(f"  {_describe(p.key)}{mark} [{source}]")
            lines += ["    " + line for line in str(p.plan).splitlines()]
        for report in self.conversions:
            lines += ["  " + line for line in str(report).splitlines()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the budget, what was allowed, and every plan with its shape."""
        plans = []
        for p in self.plans:
            data = _plan_to_dict(p.plan)
            if data is not None:
                plans.append({"shape": [[n, list(s)] for n, s in p.key], **data})
        return {
            "budget": self.budget if self.budget is not None else str(self.budget_form),
            "reserve": self.reserve,
            "allow": list(self.allow),
            "fingerprint": self.fingerprint(),
            "plans": plans,
        }

    def fingerprint(self) -> str:
        """A digest of what a plan depends on besides the budget: the model (class, every parameter's name,
        shape, dtype, device type, trainability), the planning config, the optimizer's type and whether a
        ``loss_fn`` is given. Saved plans with another fingerprint are measured again. Taken once, at the
        first ``prepare``, ``load`` or ``to_dict`` (before conversions change the model)."""
        if self._fingerprint is not None:
            return self._fingerprint
        tensors = [
            [name, list(t.shape), str(t.dtype), t.device.type, bool(t.requires_grad)]
            for name, t in self.model.named_parameters()
        ]
        data = {
            "model": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "tensors": tensors,
            "config": None if self.config is None else self.config.to_dict(),
            "optimizer": None if self.optimizer is None else type(self.optimizer).__qualname__,
            "loss_fn": self.loss_fn is not None,
        }
        digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
        self._fingerprint = digest[:16]
        return self._fingerprint

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    def load(self, path_or_data: str | Path | Mapping[str, Any], *, strict: bool = True) -> bool:
        """Reuse saved plans (no measuring): a plan for a shape runs that shape and smaller ones. Returns
        whether they were taken.

        Plans saved for another budget or other techniques raise ``UserError`` (with ``strict=False``:
        a note, and nothing is loaded). Plans saved with another gradient reserve (another
        gradient-accumulation setting) or another fingerprint (model, planning config, optimizer type:
        ``fingerprint``) are not loaded either, with a note: they are measured again when needed."""
        data = (
            json.loads(Path(path_or_data).read_text())
            if isinstance(path_or_data, (str, Path))
            else path_or_data
        )
        source = str(path_or_data) if isinstance(path_or_data, (str, Path)) else "the saved plans"
        mine = self.budget if self.budget is not None else str(self.budget_form)
        if data["budget"] != mine or tuple(data["allow"]) != self.allow:
            text = (
                f"saved plans are for budget {data['budget']}, allow {data['allow']}; these plans are "
                f"for {mine}, allow {list(self.allow)}"
            )
            if strict:
                raise UserError(text)
            self.notes.append(f"{text}: {source} not used, planning again")
            return False
        if data.get("reserve") != self.reserve or data.get("fingerprint") != self.fingerprint():
            what = (
                f"a gradient reserve of {format_size(int(data.get('reserve') or 0))} (these plans reserve "
                f"{format_size(self.reserve)}: another gradient accumulation setting)"
                if data.get("reserve") != self.reserve
                else "another model, planning config or optimizer type (fingerprint differs)"
            )
            self.notes.append(f"{source} was saved with {what}: not used, planning again")
            return False
        for entry in data["plans"]:
            key: ShapeKey = tuple((n, tuple(s)) for n, s in entry["shape"])
            if any(p.key == key for p in self.plans):
                continue
            self.plans.append(ShapePlan(key, _plan_from_dict(entry), loaded=True))
        return True

    def remove(self) -> None:
        """Remove the applied plan and undo lossy conversions (newest first)."""
        remove_plan(self.model)
        self.active = None
        for report in reversed(self.conversions):
            report.undo()
        self.conversions = []
        self._converted = False
