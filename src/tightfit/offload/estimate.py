"""What offloading one block costs, for planners: host bytes it moves and the copy time compute cannot hide.

The model (one block of a chain, copies on one side stream):

- forward: block i's copy to the host starts when block i+1 starts and overlaps its forward;
- backward: block i's copy back starts when block i+1's backward starts and overlaps it;
- so the time a step gains from offloading block i is about
  ``max(0, t_copy - t_fwd(i+1)) + max(0, t_copy - t_bwd(i+1))`` with ``t_copy = bytes / bandwidth``
  (`exposed_seconds`; a homogeneous chain uses the block's own times), and the device saves the block's
  offloaded bytes at the step's peak except for the ``max_in_flight`` blocks whose copies are unfinished.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tightfit._rng import forked_rng
from tightfit._tree import tensors_of
from tightfit.offload.config import Offload
from tightfit.offload.engine import Offloader
from tightfit.offload.target import Target

__all__ = ["BlockEstimate", "copy_seconds", "estimate_block", "exposed_seconds", "host_bandwidth"]


@contextlib.contextmanager
def unchanged(objs: Any) -> Iterator[None]:
    """Run a forward that must leave no trace: every RNG (`forked_rng`), the modules' buffers (values and
    objects: BatchNorm's running statistics and counters, caches a forward rebinds), which parameter
    objects they hold, and the values of the plain tensors in `objs` are put back on exit. Parameter
    values are not copied (a forward does not write them; a copy would double the model's memory)."""
    items = [objs] if isinstance(objs, (torch.nn.Module, torch.Tensor)) else (
        list(objs) if isinstance(objs, (list, tuple)) else [])
    modules = [m for m in items if isinstance(m, torch.nn.Module)]
    slots = []  # (dict holding it, name, the tensor object, a copy of its values or None)
    for root in modules:
        for module in root.modules():
            for name, t in module._buffers.items():
                slots.append((module._buffers, name, t, None if t is None else t.detach().clone()))
            for name, p in module._parameters.items():
                slots.append((module._parameters, name, p, None))
    rest = [i for i in items if not isinstance(i, torch.nn.Module)]
    plain = [(t, t.detach().clone()) for t in tensors_of(rest)]
    with forked_rng(list(tensors_of(objs))):
        try:
            yield
        finally:
            with torch.no_grad():
                for table, name, t, values in slots:
                    table[name] = t
                    if values is not None:
                        t.copy_(values)
                for t, values in plain:
                    t.copy_(values)


@dataclass(frozen=True)
class BlockEstimate:
    """What offloading one call would move: ``host_bytes`` in ``tensors`` storages; the bytes it leaves
    on the device, by reason (NOTE [ What never moves ] in `tightfit.offload.engine`)."""

    host_bytes: int
    tensors: int
    skipped_bytes: dict[str, int] = field(default_factory=dict)


def estimate_block(
    fn: Callable[[], Any],
    config: Offload | None = None,
    *,
    target: Target,
    protect: Any = (),
) -> BlockEstimate:
    """Run ``fn()`` (one block's forward, e.g. ``lambda: block(x)``) with nothing moved and return what an
    offload scope around it would move. RNGs, and the buffers and parameters of the modules in `protect`
    (BatchNorm statistics), are restored afterwards (`unchanged`); the graph is dropped."""
    dry = Offloader(config, target, protect=protect, dry_run=True)
    with unchanged(protect), torch.enable_grad(), dry.block("estimate"):
        out = fn()
    del out
    moved = dry.planned[-1][1] if dry.planned else 0
    tensors = dry.planned_tensors[-1] if dry.planned_tensors else 0
    return BlockEstimate(moved, tensors, dict(dry.stats.skipped_bytes))


def host_bandwidth(target: Target, config: Offload | None = None) -> float:
    """Bytes per second between host and device: ``config.host_bandwidth`` if set, else the target's."""
    if config is not None and config.host_bandwidth is not None:
        return float(config.host_bandwidth)
    return target.bandwidth()


def copy_seconds(nbytes: int, bandwidth: float) -> float:
    """One-way copy time of `nbytes` at `bandwidth` bytes per second."""
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth!r}")
    return nbytes / bandwidth


def exposed_seconds(host_bytes: int, forward_seconds: float, backward_seconds: float,
                    bandwidth: float) -> float:
    """Copy time not hidden behind compute: each direction's copy minus the neighbouring block's
    forward (the copy out) or backward (the copy back), floored at zero (module docstring)."""
    t = copy_seconds(host_bytes, bandwidth)
    return max(0.0, t - forward_seconds) + max(0.0, t - backward_seconds)
