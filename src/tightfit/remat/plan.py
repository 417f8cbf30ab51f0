"""The remat ``Plan``: which option each block runs with, and what the step is predicted and measured to cost.

All memory numbers are bytes of the ABSOLUTE live-tensor peak of one full training step as the ruler
(``tightfit.memory.LiveTracker``) measures it: parameters, gradients, optimizer state (when an optimizer
was given), inputs, activations and temporaries. Times are seconds per training step.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tightfit.remat.config import RematConfig
from tightfit.remat.options import STORE, InSegment, KeepOps, Option, Segment, parse_option, segment_length
from tightfit.sizes import format_size

COMPILE_BUDGET_LEGEND = (
    "under torch.compile the model's forward is traced inside torch.autograd.graph."
    "region_activation_memory_budget: the compiler's knapsack recomputes cheap ops (no effect in eager mode; "
    "the keeps above are eager measurements)"
)


def _legend_label(option: Option) -> str:
    """How the legend under a plan table names an option (one line per kind of measured option)."""
    match option:
        case KeepOps():
            return "keep N ops"
        case Segment():
            return "segment of N"
    return option.label


def calls_by_path(decisions: Sequence[Any], option_of: Callable[[Any], Option]) -> dict[str, list[Option]]:
    """path -> the option of each call of ``decisions`` (each with ``path`` and ``call``; ``option_of``
    reads its remat option), the form ``tightfit.remat.execute.apply`` takes: calls of a module before its
    first planned one are stored."""
    out: dict[str, list[Option]] = {}
    for d in sorted(decisions, key=lambda d: (d.path, d.call)):
        calls = out.setdefault(d.path, [])
        calls.extend([STORE] * (d.call - len(calls)))
        calls.append(option_of(d))
    return out


def units(options: Sequence[Option]) -> list[tuple[int, int]]:
    """(first, last index) of each printed unit of a plan's options in call order: a block alone, or a
    segment's blocks together."""
    out, i = [], 0
    while i < len(options):
        n = segment_length(options[i])
        out.append((i, min(i + n, len(options)) - 1))
        i += n
    return out


@dataclass
class Decision:
    """One block's decision: the ``call``-th call of submodule ``path`` runs with ``option``."""

    name: str
    path: str
    call: int
    group: int
    option: Option
    keep: int  # bytes the block keeps for its backward under this option (measured, isolated)
    extra_time: float  # seconds of recompute this option adds over storing everything


@dataclass
class Plan:
    """A remat plan with predicted and (once verified) measured peak and step time."""

    budget: int
    decisions: list[Decision]
    peak: int  # predicted peak, bytes
    time: float  # predicted step time, seconds
    measured_peak: int | None = None
    measured_time: float | None = None
    baseline_peak: int | None = None  # no remat, measured
    baseline_time: float | None = None
    min_budget: int | None = None  # measured peak of the most memory-frugal plan
    planning_time: float = 0.0  # seconds: capture + measure + solve + verify
    measure_time: float = 0.0  # seconds of it capturing and measuring the model (once per Planner)
    verify_time: float = 0.0  # seconds of it measuring the chosen plan(s): peak, and the step time
    solve_budget: int | None = None  # the internal budget the last solve used (lowered by verification)
    iterations: int = 0  # solve/verify rounds
    source: str = ""  # how the blocks were found
    notes: list[str] = field(default_factory=list)
    # for torch.compile: the compiler's activation memory budget over the model's forward (None: not used)
    compile_budget: float | None = None
    config: RematConfig | None = None  # how it was planned (None: a plan saved before configs were recorded)
    # the search that chose it: per measured candidate, the DP budget it was solved for, its predicted and
    # measured peak (bytes); what planning learned for this plan, kept here rather than in the Planner
    trials: list[dict[str, Any]] = field(default_factory=list)

    # -- views --------------------------------------------------------------------------------------
    @property
    def options(self) -> dict[str, list[Option]]:
        """path -> option of each call, the form ``tightfit.remat.execute.apply`` takes (calls of a module
        before its first planned one are stored)."""
        return calls_by_path(self.decisions, lambda d: d.option)

    @property
    def checkpointed(self) -> list[str]:
        """Names of blocks that recompute something (every block of a segment)."""
        return [d.name for d in self.decisions if d.option.checkpointed]

    def _units(self) -> list[tuple[int, int, str]]:
        """(first, last decision index, label): single blocks, and segments as one unit each."""
        return [(a, b, self.decisions[a].option.label) for a, b in units([d.option for d in self.decisions])]

    def summary(self) -> str:
        counts = Counter(label for _, _, label in self._units())
        text = ", ".join(f"{n} x {o}" for o, n in sorted(counts.items()))
        if self.compile_budget is not None:
            text += f", compiler budget {self.compile_budget:g}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; options as their keys, the config as its fields."""
        out = asdict(self)
        out["decisions"] = [{**asdict(d), "option": d.option.key} for d in self.decisions]
        out["config"] = None if self.config is None else self.config.to_dict()
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """The plan ``to_dict`` wrote (also plans saved before ``config`` and ``trials`` were recorded)."""
        data = dict(data)
        decisions = [Decision(**{**d, "option": parse_option(d["option"])}) for d in data.pop("decisions")]
        config = data.pop("config", None)
        return cls(
            decisions=decisions, config=None if config is None else RematConfig.from_dict(config), **data
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    # -- printing -----------------------------------------------------------------------------------
    def _rows(self) -> list[tuple[str, str, str, str]]:
        """(blocks, option, keep per unit, extra time per unit) with runs of equal units merged."""
        ds = self.decisions
        units = self._units()
        rows: list[tuple[str, str, str, str]] = []
        u = 0
        while u < len(units):
            first, last, label = units[u]
            v = u
            while (
                v + 1 < len(units)
                and units[v + 1][2] == label
                and ds[units[v + 1][0]].group == ds[first].group
            ):
                v += 1
            end = units[v][1]
            names = (
                ds[first].name if first == end else f"{ds[first].name} .. {ds[end].name} ({end - first + 1})"
            )
            extra = sum(d.extra_time for d in ds[first : last + 1])
            rows.append((names, label, format_size(ds[first].keep), f"{extra * 1e3:+.2f} ms"))
            u = v + 1
        return rows

    def __str__(self) -> str:
        def size(x: int | None) -> str:
            return "-" if x is None else format_size(x)

        def secs(x: float | None) -> str:
            return "-" if x is None else f"{x * 1e3:.1f} ms"

        lines = [
            f"remat plan for budget {format_size(self.budget)}: {self.summary()} (blocks: {self.source})"
        ]
        rows = [("blocks", "option", "keeps each", "recompute each"), *self._rows()]
        widths = [max(len(r[k]) for r in rows) for k in range(4)]
        for n, r in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if n == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        labels = {
            _legend_label(d.option): d.option for d in self.decisions if not isinstance(d.option, InSegment)
        }
        for label, option in sorted(labels.items()):
            lines.append(f"  {label}: {option.description}")
        if self.compile_budget is not None:
            lines.append(f"  compiler budget {self.compile_budget:g}: {COMPILE_BUDGET_LEGEND}")
        ratio = ""
        if self.measured_time and self.baseline_time:
            ratio = f" (x{self.measured_time / self.baseline_time:.2f} of no remat)"
        solve = self.planning_time - self.measure_time - self.verify_time
        lines += [
            f"  peak:  predicted {size(self.peak)}, measured {size(self.measured_peak)}, "
            f"no remat {size(self.baseline_peak)}, smallest feasible {size(self.min_budget)}",
            f"  step:  predicted {secs(self.time)}, measured {secs(self.measured_time)}{ratio}, "
            f"no remat {secs(self.baseline_time)}",
            f"  planning: {self.planning_time:.2f} s (capture + measure {self.measure_time:.2f} s, solve "
            f"{solve:.2f} s, verify {self.verify_time:.2f} s in {self.iterations} round(s))",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
