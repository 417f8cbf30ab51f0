"""``RematConfig``: how ``rematerialize`` and ``Planner`` plan, validated once and recorded in every ``Plan``.

A frozen dataclass, as ``FewBit`` and ``Sketch`` are: the same config makes the same measurements and the
same search, so a plan saved as JSON (``Plan.config``) says how it was made and can be made again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from tightfit.remat.options import NAMED_OPTIONS, Option


@dataclass(frozen=True)
class RematConfig:
    """How to plan recomputation.

    ``options``: the named in-block options (keys, or ``Option``s stored as their keys) measured for
    every block (``store`` is always measured, ``recompute`` always added). ``op_level``: also measure
    options that keep the outputs of the ops saving the most recompute time per byte (``KeepOps``).
    ``segments``: a plan may checkpoint runs of consecutive blocks as one region (``Segment``).
    ``keep_output``: the budget counts the model output as alive until the step ends (False: a loop that
    keeps only the loss). ``compile_backend``: plan for ``torch.compile(model, backend=...)`` (op-level
    options and segments are then off). ``keep_tolerance``: of the plans predicted within this fraction of
    the fastest step time, keep the one keeping least after the forward. ``calibrate_times``: scale
    predicted extra times to a timed all-recomputed step (None: on accelerators only). ``timing_reps``:
    timed steps per measured plan, their median (None: 3 compiled, 1 eager). ``flop_rate``: FLOP/s for
    FLOP-counted times (estimation under fake tensors), None: clocks.
    """

    options: tuple[str, ...] = NAMED_OPTIONS
    op_level: bool = True
    segments: bool = True
    keep_output: bool = True
    compile_backend: str | Callable[..., Any] | None = None
    keep_tolerance: float = 0.01  # 1% of the step time: below the noise of a timed step
    calibrate_times: bool | None = None
    timing_reps: int | None = None
    flop_rate: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.options, (str, Option)):
            raise TypeError(f"options must be a sequence of option names, got {self.options!r}")
        keys = tuple(o.key if isinstance(o, Option) else o for o in self.options)
        bad = [o for o in keys if o not in NAMED_OPTIONS]
        if bad:
            raise ValueError(f"unknown remat options {bad}; valid options: {', '.join(NAMED_OPTIONS)}")
        object.__setattr__(self, "options", keys)
        if not 0.0 <= self.keep_tolerance < 1.0:
            raise ValueError(
                f"keep_tolerance must be in [0, 1) (a fraction of the step time), got {self.keep_tolerance}"
            )
        if self.timing_reps is not None and (not isinstance(self.timing_reps, int) or self.timing_reps < 1):
            raise ValueError(f"timing_reps must be a positive int or None, got {self.timing_reps!r}")
        if self.flop_rate is not None and not self.flop_rate > 0:
            raise ValueError(f"flop_rate must be a positive number of FLOP/s or None, got {self.flop_rate}")
        if self.compile_backend is not None and not (
            isinstance(self.compile_backend, str) or callable(self.compile_backend)
        ):
            raise TypeError(
                f"compile_backend must be a backend name or callable, got {self.compile_backend!r}"
            )

    @property
    def compiled(self) -> bool:
        return self.compile_backend is not None

    @property
    def planned_segments(self) -> bool:
        """Whether plans may hold segments (eager only: a compiled graph cannot span block calls)."""
        return self.segments and not self.compiled

    @property
    def planned_op_level(self) -> bool:
        """Whether op-level options are measured (eager only: op positions differ in a compiled trace)."""
        return self.op_level and not self.compiled

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (a callable compile backend is recorded by its name)."""
        out = asdict(self)
        out["options"] = list(self.options)
        backend = self.compile_backend
        if backend is not None and not isinstance(backend, str):
            out["compile_backend"] = getattr(backend, "__name__", repr(backend))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RematConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RematConfig fields {unknown}; valid: {', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if k == "options" else v for k, v in data.items()})
