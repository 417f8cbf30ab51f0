"""The ``Plan`` that ``tightfit.plan`` returns: per block, how it runs (techniques, kept bytes, extra time,
gradient SQNR), the predicted and measured peak and step time, and ``apply_`` to train with it.

Memory numbers are bytes of the ABSOLUTE live-tensor peak of one full training step as the ruler
(``tightfit.memory.LiveTracker``) measures it; times are seconds per training step.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from tightfit.convert import ConversionReport
from tightfit.planner.variants import Combined, Variant, convert_blocks, undo_all
from tightfit.remat import execute
from tightfit.remat.options import InSegment, Option, Segment, Store, parse_option
from tightfit.remat.plan import calls_by_path, units
from tightfit.sizes import format_size

__all__ = ["Plan", "PlanDecision", "techniques_of"]

_REPORTS = "_tightfit_plan_reports"  # on an applied model: the conversions' reports, to undo them


def techniques_of(option: Option) -> tuple[str, ...]:
    """The ``allow`` names an option uses: "recompute" for anything that recomputes, "fewbit", "sketch"."""
    base, variant = (option.base, option.variant) if isinstance(option, Combined) else (option, None)
    out: list[str] = []
    if base.checkpointed:
        out.append("recompute")
    if variant is not None:
        out += variant.techniques
    return tuple(out)


@dataclass
class PlanDecision:
    """One block call's decision: the ``call``-th call of submodule ``path`` runs with ``option``."""

    name: str
    path: str
    call: int
    group: int
    option: Option
    keep: int  # bytes the block keeps for its backward (measured on the group's block, isolated)
    extra_time: float  # seconds this option adds over storing everything (negative: faster)
    sqnr: float | None = None  # dB of the block's parameter gradients against store's; None: lossless

    @property
    def techniques(self) -> tuple[str, ...]:
        return techniques_of(self.option)

    @property
    def lossy(self) -> bool:
        return self.sqnr is not None

    @property
    def remat_option(self) -> Option:
        """What the remat executor runs for this call (the conversion is applied to the module)."""
        return self.option.base if isinstance(self.option, Combined) else self.option


def _option_key(option: Option) -> str:
    if isinstance(option, Combined):
        return f"combined:{option.variant.key}|{option.base.key}"
    return option.key


def _parse_key(key: str) -> Option:
    if key.startswith("combined:"):
        variant, base = key[len("combined:") :].split("|")
        return Combined(parse_option(base), Variant.parse(variant))
    return parse_option(key)


def _db(x: float | None) -> str:
    if x is None:
        return "exact"
    return "inf" if math.isinf(x) and x > 0 else f"{x:.1f} dB"


@dataclass
class Plan:
    """A plan across techniques, with predicted and (once verified) measured peak and step time."""

    budget: int
    decisions: list[PlanDecision]
    peak: int  # predicted peak, bytes
    time: float  # predicted step time, seconds
    allow: tuple[str, ...] = ()
    min_grad_sqnr: dict[str, float] = field(default_factory=dict)  # SQNR floor (dB) per lossy technique
    measured_peak: int | None = None
    measured_time: float | None = None
    baseline_peak: int | None = None  # nothing applied, measured
    baseline_time: float | None = None
    min_budget: int | None = None  # measured peak of the most frugal plan for ``allow``
    grads_equal: bool | None = None  # gradients torch.equal to the unmodified model's (checked when lossless)
    grad_sqnr: float | None = None  # dB of the whole model's gradients against the unmodified model's
    candidates: int = 0  # block options measured (the chain DP's candidates, all groups)
    planning_time: float = 0.0
    measure_time: float = 0.0
    verify_time: float = 0.0
    iterations: int = 0
    source: str = ""
    notes: list[str] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)

    # -- views --------------------------------------------------------------------------------------
    @property
    def techniques(self) -> tuple[str, ...]:
        """Every technique the plan uses (``allow`` names), in the order of ``TECHNIQUES``."""
        used = {t for d in self.decisions for t in d.techniques}
        return tuple(t for t in ("recompute", "offload", "fewbit", "sketch") if t in used)

    @property
    def lossless(self) -> bool:
        return not any(d.lossy for d in self.decisions)

    @property
    def options(self) -> dict[str, list[Option]]:
        """path -> remat option of each call, as ``tightfit.remat.execute.apply`` takes it."""
        return calls_by_path(self.decisions, lambda d: d.remat_option)

    @property
    def conversions(self) -> dict[Variant, list[str]]:
        """variant -> the block paths it converts."""
        out: dict[Variant, list[str]] = {}
        for d in self.decisions:
            if isinstance(d.option, Combined) and d.path not in out.get(d.option.variant, []):
                out.setdefault(d.option.variant, []).append(d.path)
        return out

    # -- applying -----------------------------------------------------------------------------------
    def apply_(self, model: torch.nn.Module, *, offload_target: Any = None) -> torch.nn.Module:
        """Apply the plan to ``model`` in place (module swaps through ``tightfit.convert_`` restricted to
        the planned blocks, then the per-call remat options through ``tightfit.remat.execute``); sets
        ``model.plan`` and returns the model to train. A plan applied before is removed first
        (``undo_``); nothing stays half-applied when applying raises. ``offload_target``: the
        ``tightfit.offload`` target of offload decisions (None: the model's accelerator). A Hugging Face
        model gets ``config.use_cache = False``, as ``rematerialize`` sets it (a recomputed block would
        append to its KV cache twice)."""
        self.undo_(model)
        config = getattr(model, "config", None)
        if getattr(config, "use_cache", False) and any(d.remat_option.checkpointed for d in self.decisions):
            config.use_cache = False  # type: ignore[union-attr]
        reports: list[ConversionReport] = []
        try:
            for variant, paths in self.conversions.items():
                reports += convert_blocks(model, variant, paths, offload_target)
            execute.apply(model, self.options)
        except BaseException:
            execute.undo(model)
            undo_all(reports)
            raise
        model.__dict__[_REPORTS] = reports
        model.__dict__["plan"] = self
        return model

    @staticmethod
    def undo_(model: torch.nn.Module) -> torch.nn.Module:
        """Remove a plan applied with ``apply_`` (original modules and forwards back); returns the model."""
        execute.undo(model)
        undo_all(model.__dict__.pop(_REPORTS, []))
        if isinstance(model.__dict__.get("plan"), Plan):
            del model.__dict__["plan"]
        return model

    # -- serialising --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "decisions"}
        out["allow"] = list(self.allow)
        out["decisions"] = [
            {**{k: v for k, v in d.__dict__.items() if k != "option"}, "option": _option_key(d.option)}
            for d in self.decisions
        ]
        out["min_grad_sqnr"] = dict(self.min_grad_sqnr)
        if out["grad_sqnr"] is not None and math.isinf(out["grad_sqnr"]):
            out["grad_sqnr"] = "inf" if out["grad_sqnr"] > 0 else "-inf"
        for d in out["decisions"]:
            if d["sqnr"] is not None and math.isinf(d["sqnr"]):
                d["sqnr"] = "inf" if d["sqnr"] > 0 else "-inf"
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        data = dict(data)
        decisions = [
            PlanDecision(
                **{
                    **d,
                    "option": _parse_key(d["option"]),
                    "sqnr": None if d["sqnr"] is None else float(d["sqnr"]),
                }
            )
            for d in data.pop("decisions")
        ]
        if data.get("grad_sqnr") is not None:
            data["grad_sqnr"] = float(data["grad_sqnr"])
        data["allow"] = tuple(data.get("allow", ()))
        return cls(decisions=decisions, **data)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    # -- printing -----------------------------------------------------------------------------------
    def _units(self) -> list[tuple[int, int]]:
        return units([d.option for d in self.decisions])

    def summary(self) -> str:
        counts = Counter(self.decisions[a].option.label for a, _ in self._units())
        return ", ".join(f"{n} x {o}" for o, n in sorted(counts.items()))

    def _rows(self) -> list[tuple[str, ...]]:
        rows: list[tuple[str, ...]] = []
        units = self._units()
        u = 0
        ds = self.decisions
        while u < len(units):
            first, last = units[u]
            label = ds[first].option.label
            v = u
            while (
                v + 1 < len(units)
                and ds[units[v + 1][0]].option.label == label
                and ds[units[v + 1][0]].group == ds[first].group
            ):
                v += 1
            end = units[v][1]
            names = (
                ds[first].name if first == end else f"{ds[first].name} .. {ds[end].name} ({end - first + 1})"
            )
            techniques = ", ".join(ds[first].techniques) or "store"
            extra = sum(d.extra_time for d in ds[first : last + 1])
            rows.append(
                (
                    names,
                    techniques,
                    label,
                    format_size(ds[first].keep),
                    f"{extra * 1e3:+.2f} ms",
                    _db(ds[first].sqnr),
                )
            )
            u = v + 1
        return rows

    def __str__(self) -> str:
        return render(self)


def render(plan: Plan) -> str:
    """The plan as a table (what ``str(plan)`` prints): per block its techniques, option, kept bytes, extra
    time and gradient SQNR; predicted and measured peak and step time; notes."""

    def size(x: int | None) -> str:
        return "-" if x is None else format_size(x)

    def secs(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.1f} ms"

    lines = [
        f"plan for budget {format_size(plan.budget)} (allow: {', '.join(plan.allow) or 'nothing'}): "
        f"{plan.summary()} (blocks: {plan.source})"
    ]
    rows = [("blocks", "techniques", "option", "keeps each", "extra each", "grad SQNR"), *plan._rows()]
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for n, r in enumerate(rows):
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    legend = {
        d.option.label: d.option for d in plan.decisions if not isinstance(d.option, (InSegment, Store))
    }
    for label, option in sorted(legend.items()):
        name = "segment of N" if isinstance(option, Segment) else label
        lines.append(f"  {name}: {option.description}")
    ratio = ""
    if plan.measured_time and plan.baseline_time:
        ratio = f" (x{plan.measured_time / plan.baseline_time:.2f} of the unmodified model)"
    grads = "torch.equal to the unmodified model" if plan.grads_equal else "-"
    if plan.grad_sqnr is not None and not plan.grads_equal:
        used = [t for t in plan.techniques if t in plan.min_grad_sqnr]
        floors = ", ".join(f"{t} {plan.min_grad_sqnr[t]:g} dB" for t in used)
        grads = f"SQNR {_db(plan.grad_sqnr)} against the unmodified model (block floors: {floors})"
    lines += [
        f"  peak:  predicted {size(plan.peak)}, measured {size(plan.measured_peak)}, "
        f"unmodified {size(plan.baseline_peak)}, smallest feasible {size(plan.min_budget)}",
        f"  step:  predicted {secs(plan.time)}, measured {secs(plan.measured_time)}{ratio}, "
        f"unmodified {secs(plan.baseline_time)}",
        f"  gradients: {grads}",
        f"  planning: {plan.planning_time:.2f} s (measure {plan.measure_time:.2f} s, {plan.candidates} block "
        f"options measured; verify {plan.verify_time:.2f} s in {plan.iterations} round(s))",
    ]
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)
