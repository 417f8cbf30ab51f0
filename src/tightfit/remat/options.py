"""The ways one block call can run under a remat plan: one frozen type each, torch-free.

Each option has one ``key`` (its JSON string, the form saved plans hold: ``"store"``, ``"save-matmul"``,
``"keep-ops:3,7@142:<digest>"``, ``"segment:4"``, ...), one ``label`` for tables, one ``description`` of
what it keeps for the backward, and one validation (in ``__post_init__``; ``parse_option`` reads a key).
Code that handles options matches on these types (``match option: case Store(): ...``), never on strings.

    Store()                    plain autograd: every tensor the backward needs is kept
    SavePolicy("save-matmul")  checkpoint with a selective policy keeping matmul/conv/attention outputs
    SavePolicy("save-linear")  the same keeping projections (mm/addmm/conv) only
    KeepOps(indices, count, digest)  keep the outputs of the measured ops at ``indices``
    Recompute()                checkpoint the whole block: keep its inputs, recompute everything
    Segment(n)                 this call opens ONE checkpoint region over n consecutive block calls
    InSegment()                a later call of the open region
"""

from __future__ import annotations

from dataclasses import dataclass

STORE_KEY = "store"
RECOMPUTE_KEY = "recompute"
SAVE_MATMUL_KEY = "save-matmul"
SAVE_LINEAR_KEY = "save-linear"
KEEP_OPS_KEY = "keep-ops"
SEGMENT_KEY = "segment"
IN_SEGMENT_KEY = "in-segment"

# the named save policies and what each keeps (the op sets live in ``tightfit.remat.execute``)
POLICY_DESCRIPTIONS = {
    SAVE_MATMUL_KEY: "keeps outputs of matmuls, convolutions and attention; recomputes pointwise ops, norms, "
    "softmax, dropout",
    SAVE_LINEAR_KEY: "keeps outputs of matmuls and convolutions (projections); recomputes attention too",
}


class Option:
    """Base of the remat options (frozen dataclasses, hashable, equal when their keys are equal)."""

    @property
    def key(self) -> str:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    @property
    def label(self) -> str:
        """A short name for tables."""
        return self.key

    @property
    def description(self) -> str:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    @property
    def checkpointed(self) -> bool:
        """Whether the call recomputes something in the backward."""
        return True

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class Store(Option):
    @property
    def key(self) -> str:
        return STORE_KEY

    @property
    def description(self) -> str:
        return "keeps everything autograd saves (no recompute)"

    @property
    def checkpointed(self) -> bool:
        return False


@dataclass(frozen=True)
class Recompute(Option):
    @property
    def key(self) -> str:
        return RECOMPUTE_KEY

    @property
    def description(self) -> str:
        return "keeps only the block's inputs; recomputes the whole block"


@dataclass(frozen=True)
class SavePolicy(Option):
    """A named selective-checkpoint policy (``save-matmul`` or ``save-linear``)."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in POLICY_DESCRIPTIONS:
            raise ValueError(f"unknown save policy {self.name!r}; valid: {', '.join(POLICY_DESCRIPTIONS)}")

    @property
    def key(self) -> str:
        return self.name

    @property
    def description(self) -> str:
        return POLICY_DESCRIPTIONS[self.name]


@dataclass(frozen=True)
class KeepOps(Option):
    """Keep the outputs of the ops at ``indices`` (in the order a selective-checkpoint policy sees them) and
    recompute the rest; ``count`` ops with names hashing to ``digest`` are what the block ran when it was
    measured (a call running other ops runs under recompute instead: ``tightfit.remat.execute``)."""

    indices: frozenset[int]
    count: int
    digest: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", frozenset(self.indices))
        if self.count < 0 or any(not 0 <= i < max(self.count, 1) for i in self.indices):
            raise ValueError(f"keep-ops indices {sorted(self.indices)} must lie in [0, {self.count})")
        if not self.digest or any(c in self.digest for c in ":@,"):
            raise ValueError(f"malformed keep-ops digest {self.digest!r}")

    @property
    def key(self) -> str:
        indices = ",".join(str(i) for i in sorted(self.indices))
        return f"{KEEP_OPS_KEY}:{indices}@{self.count}:{self.digest}"

    @property
    def label(self) -> str:
        return f"keep {len(self.indices)} ops"

    @property
    def description(self) -> str:
        return "keeps the outputs of the N ops saving the most measured recompute time per byte"


@dataclass(frozen=True)
class Segment(Option):
    """This block call opens one checkpoint region over ``length`` consecutive block calls."""

    length: int

    def __post_init__(self) -> None:
        if not isinstance(self.length, int) or self.length < 2:
            raise ValueError(f"a segment spans at least 2 block calls, got {self.length!r}")

    @property
    def key(self) -> str:
        return f"{SEGMENT_KEY}:{self.length}"

    @property
    def label(self) -> str:
        return f"segment of {self.length}"

    @property
    def description(self) -> str:
        return (
            "one checkpoint over N consecutive blocks: keeps only what enters the first, recomputes all N "
            "in the backward"
        )


@dataclass(frozen=True)
class InSegment(Option):
    """A later block call of the region a ``Segment`` opened."""

    @property
    def key(self) -> str:
        return IN_SEGMENT_KEY

    @property
    def description(self) -> str:
        return "recomputed inside the segment that holds it"


STORE = Store()
RECOMPUTE = Recompute()
SAVE_MATMUL = SavePolicy(SAVE_MATMUL_KEY)
SAVE_LINEAR = SavePolicy(SAVE_LINEAR_KEY)
IN_SEGMENT = InSegment()
# the options a user can name (``RematConfig.options``, by key); KeepOps and segments come from measuring
DEFAULT_OPTIONS: tuple[Option, ...] = (STORE, SAVE_MATMUL, SAVE_LINEAR, RECOMPUTE)
NAMED_OPTIONS: tuple[str, ...] = tuple(o.key for o in DEFAULT_OPTIONS)
_NAMED: dict[str, Option] = {o.key: o for o in (STORE, SAVE_MATMUL, SAVE_LINEAR, RECOMPUTE, IN_SEGMENT)}


def parse_option(key: str | Option) -> Option:
    """The option a JSON key names (an ``Option`` is returned as it is); ValueError naming the valid forms."""
    if isinstance(key, Option):
        return key
    if not isinstance(key, str):
        raise TypeError(f"a remat option is an Option or its key string, got {type(key).__name__}")
    if key in _NAMED:
        return _NAMED[key]
    if key.startswith(KEEP_OPS_KEY + ":"):
        try:
            indices, sequence = key[len(KEEP_OPS_KEY) + 1 :].split("@")
            count, digest = sequence.split(":")
            return KeepOps(frozenset(int(i) for i in indices.split(",") if i), int(count), digest)
        except ValueError:
            raise ValueError(
                f"malformed option {key!r}: expected 'keep-ops:<op indices>@<op count>:<digest>'"
            ) from None
    if key.startswith(SEGMENT_KEY + ":"):
        try:
            return Segment(int(key[len(SEGMENT_KEY) + 1 :]))
        except ValueError:
            raise ValueError(
                f"malformed option {key!r}: expected 'segment:<n>' with n >= 2 block calls"
            ) from None
    raise ValueError(
        f"unknown remat option {key!r}; valid: {', '.join(NAMED_OPTIONS)}, "
        f"'{KEEP_OPS_KEY}:...' (measured), '{SEGMENT_KEY}:<n>' or '{IN_SEGMENT_KEY}'"
    )


def segment_length(option: Option) -> int:
    """Block calls covered by the unit ``option`` starts: n for ``Segment(n)``, else 1."""
    return option.length if isinstance(option, Segment) else 1
