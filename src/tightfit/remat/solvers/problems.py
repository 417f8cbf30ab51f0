"""Problem types for the rematerialization solvers: chains of stages and forward DAGs, with JSON round-trip.

NOTE (chain memory model). This is the contract between the solvers, the simulator and whoever maps real
measured bytes onto a :class:`Chain`. A chain of ``L`` stages maps ``x_0 -> x_1 -> ... -> x_L``; stage ``i``
reads ``x_i`` (``input_size[i]`` bytes) and writes ``x_{i+1}`` (``input_size[i+1]``, or ``output_size`` for
the last stage). The gradient ``d_i`` of ``x_i`` has the size of ``x_i``. Values that count, and when:

* ``x_0`` is in memory from the start (the chain input counts against the budget); ``d_0`` is in memory
  at the end (the gradient handed back to the caller counts too).
* forward of stage ``i`` WITHOUT tape (``ForwardNoSave`` / ``ForwardCheckpoint``): while it runs, memory is
  ``live + size(x_{i+1}) + fwd_overhead[i]`` (``x_i`` is still live). It keeps only ``x_{i+1}``;
  ``ForwardNoSave`` then frees ``x_i``, ``ForwardCheckpoint`` keeps it (a checkpoint).
* forward of stage ``i`` WITH tape option ``o`` (``ForwardTape``): while it runs, memory is
  ``live + size(x_{i+1}) + tape_size[o] + fwd_overhead[o]``; afterwards ``x_{i+1}`` and the tape stay.
  The TAPE is everything the backward of the stage needs EXCEPT its input ``x_i`` and the output gradient
  ``d_{i+1}`` (those are counted separately). If the stage saves its own output, count it in the tape
  (then it is counted twice while ``x_{i+1}`` is also live: an over-estimate, never an under-estimate).
* the loss (``Loss``) turns ``x_L`` into ``d_L``: memory ``live + output_size`` while it runs, then
  ``x_L`` is freed.
* backward of stage ``i`` (``Backward``) needs ``x_i``, the tape of stage ``i`` and ``d_{i+1}``; while it
  runs, memory is ``live + size(d_i) + bwd_overhead[o]``; afterwards ``x_i``, the tape and ``d_{i+1}`` are
  freed and ``d_i`` stays.
* parameters, their gradients and optimizer state are NOT part of the model: subtract them from the
  budget before calling a solver.

The peak of a schedule is the largest of these sums over its steps. Overheads are transient bytes a step
allocates and frees itself (temporaries, workspace). Times are arbitrary consistent units.

NOTE (DAG model). A :class:`Dag` is a forward graph; node ``v`` computes one value of ``size[v]`` bytes from
the values of ``deps[v]`` in ``fwd_time[v]``. Its backward (``bwd_time[v]``) needs the gradient of its
output and the forward values ``bwd_deps[v]`` (default: its inputs ``deps[v]``), and produces one gradient
blob of ``sum(size[u] for u in deps[v])`` bytes (the gradients of its inputs). Solvers work on the joint
forward+backward graph (:mod:`.dag`): a node's backward reads the blobs of all its users' backwards.
Sink nodes start their backward from an implicit seed gradient of size 0 (a scalar loss).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "TapeOption",
    "Chain",
    "Dag",
    "ForwardNoSave",
    "ForwardCheckpoint",
    "ForwardTape",
    "Loss",
    "Backward",
    "Free",
    "Compute",
    "Release",
    "Op",
    "Schedule",
    "op_from_dict",
]


def _check_seq(name: str, values: Sequence[float], n: int | None = None) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a sequence of numbers, got {values!r}") from e
    if n is not None and len(out) != n:
        raise ValueError(f"{name} has {len(out)} entries, expected {n} (one per stage/node)")
    for i, v in enumerate(out):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}[{i}] = {v!r}: must be a finite number >= 0")
    return out


@dataclass(frozen=True)
class TapeOption:
    """One way to run a stage's forward so that its backward needs no recomputation (Rockmate's options).

    ``tape_size`` is what the stage keeps for its backward besides its input and output gradient (see the
    module NOTE); ``fwd_time``/``bwd_time`` the times of the taped forward and of the backward under this
    option; ``fwd_overhead``/``bwd_overhead`` their transient extra bytes.
    """

    fwd_time: float
    bwd_time: float
    tape_size: float
    fwd_overhead: float = 0.0
    bwd_overhead: float = 0.0
    name: str = ""

    def __post_init__(self) -> None:
        for k in ("fwd_time", "bwd_time", "tape_size", "fwd_overhead", "bwd_overhead"):
            v = float(getattr(self, k))
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"TapeOption.{k} = {v!r}: must be a finite number >= 0")
            object.__setattr__(self, k, v)


@dataclass
class Chain:
    """A chain of ``L`` stages, one entry per stage in each sequence (memory model: module NOTE).

    ``fwd_time[i]``: forward time of stage ``i`` run without tape; ``bwd_time[i]``: its backward time;
    ``input_size[i]``: bytes of ``x_i`` (``input_size[0]`` is the chain input); ``tape_size[i]``: bytes the
    default taped forward keeps; ``output_size``: bytes of ``x_L`` (a scalar loss: about 0);
    ``fwd_overhead``/``bwd_overhead``: per-stage transient bytes (default 0). ``options[i]``, when given and
    non-empty, replaces the single default option of stage ``i`` (built from ``fwd_time[i]``,
    ``bwd_time[i]``, ``tape_size[i]`` and the overheads) by several :class:`TapeOption`.
    """

    fwd_time: Sequence[float]
    bwd_time: Sequence[float]
    input_size: Sequence[float]
    tape_size: Sequence[float]
    output_size: float = 0.0
    fwd_overhead: Sequence[float] | None = None
    bwd_overhead: Sequence[float] | None = None
    options: Sequence[Sequence[TapeOption] | None] | None = None
    names: Sequence[str] | None = None

    def __post_init__(self) -> None:
        L = len(self.fwd_time)
        if L < 1:
            raise ValueError("a Chain needs at least one stage (fwd_time is empty)")
        self.fwd_time = _check_seq("fwd_time", self.fwd_time, L)
        self.bwd_time = _check_seq("bwd_time", self.bwd_time, L)
        self.input_size = _check_seq("input_size", self.input_size, L)
        self.tape_size = _check_seq("tape_size", self.tape_size, L)
        self.output_size = _check_seq("output_size", [self.output_size])[0]
        self.fwd_overhead = _check_seq(
            "fwd_overhead", [0.0] * L if self.fwd_overhead is None else self.fwd_overhead, L
        )
        self.bwd_overhead = _check_seq(
            "bwd_overhead", [0.0] * L if self.bwd_overhead is None else self.bwd_overhead, L
        )
        if self.options is not None:
            if len(self.options) != L:
                raise ValueError(f"options has {len(self.options)} entries, expected {L} (one per stage)")
            opts: list[list[TapeOption] | None] = []
            for i, o in enumerate(self.options):
                if o is None or len(o) == 0:
                    opts.append(None)
                    continue
                lst = [TapeOption(**x) if isinstance(x, dict) else x for x in o]
                if not all(isinstance(x, TapeOption) for x in lst):
                    raise ValueError(f"options[{i}] must hold TapeOption objects, got {o!r}")
                opts.append(lst)
            self.options = opts
        if self.names is not None:
            if len(self.names) != L:
                raise ValueError(f"names has {len(self.names)} entries, expected {L}")
            self.names = [str(n) for n in self.names]

    @property
    def length(self) -> int:
        """Number of stages ``L``."""
        return len(self.fwd_time)

    def size_of_x(self, i: int) -> float:
        """Bytes of ``x_i`` for ``0 <= i <= L`` (``x_L`` is the chain output)."""
        return self.output_size if i == self.length else self.input_size[i]

    def stage_options(self, i: int) -> list[TapeOption]:
        """The tape options of stage ``i`` (the default one when ``options[i]`` is not given)."""
        if self.options is not None and self.options[i]:
            return list(self.options[i])  # type: ignore[arg-type]
        return [
            TapeOption(
                self.fwd_time[i],
                self.bwd_time[i],
                self.tape_size[i],
                self.fwd_overhead[i],
                self.bwd_overhead[i],
            )
        ]  # type: ignore[index]

    @classmethod
    def homogeneous(
        cls,
        n: int,
        fwd_time: float = 1.0,
        bwd_time: float = 1.0,
        size: float = 1.0,
        tape_size: float = 0.0,
        output_size: float | None = None,
    ) -> Chain:
        """A chain of ``n`` identical stages (an RNN unrolled over time, the setting of Revolve/BPTT).

        ``output_size`` defaults to ``size`` (the last hidden state), so every gradient has one size.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        return cls(
            [fwd_time] * n,
            [bwd_time] * n,
            [size] * n,
            [tape_size] * n,
            output_size=size if output_size is None else output_size,
        )

    def to_dict(self) -> dict[str, Any]:
        d = {
            k: getattr(self, k)
            for k in (
                "fwd_time",
                "bwd_time",
                "input_size",
                "tape_size",
                "output_size",
                "fwd_overhead",
                "bwd_overhead",
                "names",
            )
        }
        d["options"] = (
            None
            if self.options is None
            else [None if o is None else [asdict(x) for x in o] for o in self.options]
        )
        return {"kind": "chain", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Chain:
        d = dict(d)
        if d.pop("kind", "chain") != "chain":
            raise ValueError(f"not a chain: {d!r}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> Chain:
        return cls.from_dict(json.loads(s))


@dataclass
class Dag:
    """A forward DAG with implied backward (memory model: module NOTE). Nodes are topologically ordered.

    ``deps[v]`` lists the nodes whose outputs node ``v`` reads (all ``< v``); ``bwd_deps[v]`` the forward
    values its backward reads (default ``deps[v]``; add ``v`` itself when the backward needs the output).
    """

    fwd_time: Sequence[float]
    bwd_time: Sequence[float]
    size: Sequence[float]
    deps: Sequence[Sequence[int]]
    bwd_deps: Sequence[Sequence[int]] | None = None
    names: Sequence[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.fwd_time)
        if n < 1:
            raise ValueError("a Dag needs at least one node (fwd_time is empty)")
        self.fwd_time = _check_seq("fwd_time", self.fwd_time, n)
        self.bwd_time = _check_seq("bwd_time", self.bwd_time, n)
        self.size = _check_seq("size", self.size, n)
        if len(self.deps) != n:
            raise ValueError(f"deps has {len(self.deps)} entries, expected {n}")
        self.deps = [sorted({int(u) for u in d}) for d in self.deps]
        for v, d in enumerate(self.deps):
            if any(u < 0 or u >= v for u in d):
                raise ValueError(
                    f"deps[{v}] = {d}: nodes must be topologically ordered (each dep in 0..{v - 1})"
                )
        if self.bwd_deps is None:
            self.bwd_deps = [list(d) for d in self.deps]
        else:
            if len(self.bwd_deps) != n:
                raise ValueError(f"bwd_deps has {len(self.bwd_deps)} entries, expected {n}")
            self.bwd_deps = [sorted({int(u) for u in d}) for d in self.bwd_deps]
            for v, d in enumerate(self.bwd_deps):
                if any(u < 0 or u > v for u in d):
                    raise ValueError(f"bwd_deps[{v}] = {d}: each entry must be a node in 0..{v}")
        if self.names is not None:
            if len(self.names) != n:
                raise ValueError(f"names has {len(self.names)} entries, expected {n}")
            self.names = [str(x) for x in self.names]

    @property
    def n(self) -> int:
        return len(self.fwd_time)

    @classmethod
    def from_chain(cls, chain: Chain) -> Dag:
        """The DAG of a chain with zero tapes/overheads: node 0 is ``x_0``, node ``i+1`` is stage ``i``.

        Only meaningful when ``chain`` has one option per stage with ``tape_size == 0`` and no overheads;
        then the two memory models agree except that the DAG may drop and reload ``x_0`` (a source node).
        """
        L = chain.length
        sizes = [chain.size_of_x(i) for i in range(L + 1)]
        return cls(
            [0.0] + list(chain.fwd_time),
            [0.0] + list(chain.bwd_time),
            sizes,
            [[]] + [[i] for i in range(L)],
            [[]] + [[i] for i in range(L)],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "dag",
            "fwd_time": self.fwd_time,
            "bwd_time": self.bwd_time,
            "size": self.size,
            "deps": self.deps,
            "bwd_deps": self.bwd_deps,
            "names": self.names,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Dag:
        d = dict(d)
        if d.pop("kind", "dag") != "dag":
            raise ValueError(f"not a dag: {d!r}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> Dag:
        return cls.from_dict(json.loads(s))


# ---- operations of a schedule ------------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardNoSave:
    """Run stage ``stage`` without tape and free its input afterwards (inside a recomputed segment)."""

    stage: int


@dataclass(frozen=True)
class ForwardCheckpoint:
    """Run stage ``stage`` without tape and KEEP its input ``x_stage`` as a checkpoint."""

    stage: int


@dataclass(frozen=True)
class ForwardTape:
    """Run stage ``stage`` with tape option ``option``: keep its input and tape for its backward."""

    stage: int
    option: int = 0


@dataclass(frozen=True)
class Loss:
    """Turn the chain output ``x_L`` into its gradient ``d_L`` (frees ``x_L``)."""


@dataclass(frozen=True)
class Backward:
    """Backward of stage ``stage``: consumes ``x_stage``, its tape and ``d_{stage+1}``; makes ``d_stage``."""

    stage: int


@dataclass(frozen=True)
class Free:
    """Free a chain value: ``kind`` is ``"x"`` (activation ``x_stage``), ``"tape"`` or ``"grad"``."""

    kind: str
    stage: int


@dataclass(frozen=True)
class Compute:
    """DAG schedules: compute joint-graph node ``node`` (see :mod:`.dag` for the numbering)."""

    node: int


@dataclass(frozen=True)
class Release:
    """DAG schedules: free the value of joint-graph node ``node``."""

    node: int


Op = ForwardNoSave | ForwardCheckpoint | ForwardTape | Loss | Backward | Free | Compute | Release
_OPS = {
    c.__name__: c
    for c in (ForwardNoSave, ForwardCheckpoint, ForwardTape, Loss, Backward, Free, Compute, Release)
}


def op_to_dict(op: Op) -> dict[str, Any]:
    return {"op": type(op).__name__, **asdict(op)}


def op_from_dict(d: dict[str, Any]) -> Op:
    d = dict(d)
    name = d.pop("op")
    if name not in _OPS:
        raise ValueError(f"unknown op {name!r}; valid: {sorted(_OPS)}")
    return _OPS[name](**d)


@dataclass
class Schedule:
    """A solver's answer: an explicit op sequence with its time and peak under the problem's model.

    ``time`` and ``peak`` are what :func:`simulate` returns for ``ops`` (solvers fill them by simulating).
    ``optimal`` says whether the solver proved it optimal in its schedule class; ``lower_bound`` (when
    known) is a proven lower bound on the optimal time, so ``gap = (time - lower_bound) / time``.
    """

    ops: list[Op]
    time: float
    peak: float
    budget: float | None = None
    solver: str = ""
    optimal: bool = False
    lower_bound: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        """Relative optimality gap ``(time - lower_bound) / time`` (None when no bound is known)."""
        if self.lower_bound is None:
            return None
        return 0.0 if self.time <= 0 else max(0.0, (self.time - self.lower_bound) / self.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops": [op_to_dict(o) for o in self.ops],
            "time": self.time,
            "peak": self.peak,
            "budget": self.budget,
            "solver": self.solver,
            "optimal": self.optimal,
            "lower_bound": self.lower_bound,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        d = dict(d)
        d["ops"] = [op_from_dict(o) for o in d["ops"]]
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> Schedule:
        return cls.from_dict(json.loads(s))


def store_all_ops(chain: Chain, option: int = 0) -> list[Op]:
    """Plain autograd on a chain: tape every stage (with ``option``), loss, backward everything."""
    L = chain.length
    return [ForwardTape(i, option) for i in range(L)] + [Loss()] + [Backward(i) for i in reversed(range(L))]
