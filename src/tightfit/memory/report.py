"""`MemoryReport`: the numbers of one measured (or estimated) training step and their JSON form.

``print(report)`` shows them as tables; the rendering lives in `tightfit.memory._display`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from tightfit.memory._display import render_memory_report
from tightfit.memory.live import TimelinePoint


@dataclass
class ModuleMemory:
    """One module's share: activations it created that are kept for backward (its own ops, not its
    children's), and the highest live bytes of the whole step while its forward / backward ran."""

    path: str
    saved_bytes: int
    forward_peak: int
    backward_peak: int


@dataclass
class RankPeak:
    """One rank's peak under a process group: how high, where, and per device."""

    rank: int
    peak_bytes: int
    peak_phase: str | None
    peak_op: str | None
    peak_module: str | None
    peak_by_device: dict[str, int]


@dataclass
class MemoryReport:
    """Where a training step's memory goes. Sizes are bytes of live tensors (see tightfit.memory)."""

    model: str
    device: str
    estimated: bool
    params_bytes: int
    buffers_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    inputs_bytes: int
    activations_bytes: int  # saved for backward by the forward pass (deduplicated, params excluded)
    forward_live_bytes: int  # live above the step's start when the forward returns (saved + outputs)
    baseline_bytes: int  # live when the step starts: params, buffers, optimizer state, inputs
    peak_bytes: int  # highest live bytes over forward, backward and optimizer step
    peak_phase: str | None
    peak_op: str | None
    peak_module: str | None
    phase_peaks: dict[str, int]
    per_module: dict[str, int]  # module path -> activations_bytes share; sums to activations_bytes
    modules: list[ModuleMemory]
    flops: int
    step_time: float | None  # seconds per step without measurement overhead; None when estimated
    timeline: list[TimelinePoint] | None = field(default=None, repr=False)
    # device ("cpu", "cuda:0") -> highest live bytes on that device alone; host memory is its own entry
    peak_by_device: dict[str, int] = field(default_factory=dict)
    # under a process group: this report is rank `rank` of `world_size`; `ranks` holds every rank's peak
    # (gathered when the group can communicate; estimates under a fake group hold this rank only)
    rank: int = 0
    world_size: int = 1
    parallel: str | None = None  # "ddp", "fsdp2" when estimated for a wrapper; None as measured
    ranks: list[RankPeak] = field(default_factory=list)

    def inclusive_saved(self, path: str) -> int:
        """Saved bytes created by `path` and all modules below it."""
        if path == "":
            return sum(v for k, v in self.per_module.items() if k != "<outside>")
        return sum(v for k, v in self.per_module.items() if k == path or k.startswith(path + "."))

    def to_dict(self, timeline: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not timeline:
            data.pop("timeline")
        return data

    def to_json(self, indent: int | None = 2, timeline: bool = False) -> str:
        return json.dumps(self.to_dict(timeline=timeline), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryReport:
        data = dict(data)
        data["modules"] = [ModuleMemory(**m) for m in data.get("modules", [])]
        data["ranks"] = [RankPeak(**r) for r in data.get("ranks", [])]
        if data.get("timeline") is not None:
            data["timeline"] = [TimelinePoint(**p) for p in data["timeline"]]
        return cls(**data)

    def __str__(self) -> str:
        return render_memory_report(self)
