"""`Offload`: the configuration `tightfit.convert_` applies to move what blocks save for backward to host
memory (and that `tightfit.offload.offloading` uses for a region of code)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from tightfit.convert import config_from_dict
from tightfit.offload.target import PIN_MODES
from tightfit.sizes import parse_size

__all__ = ["Offload"]


def _count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Offload.{name} must be an int >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class Offload:
    """Offload what each block of a model saves for backward to host memory, overlapped with compute.

    ``tightfit.convert_(model, Offload())`` wraps the model's blocks (or the ones passed with
    ``blocks=``); tensors a block saves move to host on a side stream while the next block computes, and
    come back one block ahead in the backward. Tensors move per storage: a saved view moves its whole
    base storage, once. Never moved: parameters, buffers and views of them (FSDP2's gathered parameters
    included), parameter casts (autocast), conjugate/negative views, storages smaller than ``min_bytes``,
    and what the last ``keep_last`` blocks save (the backward reads it first).

    - ``min_bytes``: storages smaller than this stay on the device (int or size string, "256KiB").
    - ``keep_last``: how many of the last blocks run before the backward are not offloaded.
    - ``max_in_flight``: blocks whose copies to the host may be pending at once; beyond, the forward
      waits for the oldest (bounds device memory held by unfinished copies).
    - ``prefetch``: blocks fetched back ahead of the backward's position (block i-1 ... i-prefetch
      start coming back when block i's backward starts).
    - ``max_host_bytes``: the most host memory the pool may hold (None: no limit; the pool still releases
      buffers that stayed free through a whole step); exceeding it is a clear error, before converting
      when ``convert_`` gets an ``example=`` batch.
    - ``pin``: how host buffers are pinned on CUDA: "register" (exact size), "torch" (torch's caching
      host allocator, rounds to powers of two), "none" (pageable; copies do not overlap).
    - ``host_bandwidth``: bytes/s used by estimates; None measures the device once.
    """

    # 256 KiB: one copy costs ~10 us of launch and event overhead, the time PCIe moves ~250 KiB; smaller
    # tensors add work without freeing memory that matters at a peak
    min_bytes: int | str = 256 * 1024
    # 1: the backward starts with the last block, so moving its tensors out and straight back in costs
    # two copies with nothing to hide them behind (torchtune excluded the LM head by hand for this)
    keep_last: int = 1
    # 2: the copy of block i overlaps block i+1's forward; one more block of slack absorbs jitter, and the
    # device never holds more than two blocks whose copies are unfinished
    max_in_flight: int = 2
    # 1: a block's backward (about twice its forward) hides the copy of one block of the same size
    prefetch: int = 1
    max_host_bytes: int | str | None = None  # no limit: host memory is usually many times device memory
    pin: str = "register"  # exact-size pinned buffers (torch's pinned allocator rounds 2.25 to 4 GiB)
    host_bandwidth: float | None = None  # measured on first use of an estimate

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_bytes", _size("min_bytes", self.min_bytes))
        if self.max_host_bytes is not None:
            object.__setattr__(self, "max_host_bytes", _size("max_host_bytes", self.max_host_bytes))
        _count("keep_last", self.keep_last, 0)
        _count("max_in_flight", self.max_in_flight, 1)
        _count("prefetch", self.prefetch, 0)
        if self.pin not in PIN_MODES:
            raise ValueError(f"Offload.pin must be 'register', 'torch' or 'none', got {self.pin!r}")
        if self.host_bandwidth is not None and not (
            isinstance(self.host_bandwidth, (int, float)) and self.host_bandwidth > 0
        ):
            raise ValueError(f"Offload.host_bandwidth must be a positive number of bytes/s, got "
                             f"{self.host_bandwidth!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; `Offload.from_dict(d)` rebuilds an equal config."""
        return {"technique": "offload", **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Offload:
        return config_from_dict(cls, data, "offload")

    @classmethod
    def from_json(cls, text: str) -> Offload:
        return cls.from_dict(json.loads(text))


def _size(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"Offload.{name} must be a byte count or a size string, got {value!r}")
    try:
        out = parse_size(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Offload.{name}: {exc}") from None
    if out < 0:
        raise ValueError(f"Offload.{name} must be >= 0, got {value!r}")
    return int(out)
