"""Training steps measured exactly: the live-tensor peak of one step (the ruler), gradients to compare.

Every variant of a benchmark is its own deep copy of one model, stepped the same way (grads set to None,
forward, loss, backward; no optimizer), so their peaks and gradients compare one to one. The peak is
absolute: the tensors that exist before the step (parameters, buffers, batch) are tracked and counted.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from tightfit._step import forward_loss
from tightfit.memory import LiveTracker

MiB = 2**20


def tensors_of(obj: Any) -> list[torch.Tensor]:
    """Parameters and buffers of modules, and the tensors in a (nested) batch."""
    if isinstance(obj, torch.nn.Module):
        return [*obj.parameters(), *obj.buffers()]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _tracker(track: Sequence[torch.Tensor]) -> LiveTracker:
    return LiveTracker(track=list(track))


def measure_peak(step: Callable[[], Any], track: Sequence[torch.Tensor]) -> int:
    """Absolute peak live bytes (tracked tensors + everything created) over one call of `step`."""
    return measure_step(step, track)[0]


def measure_step(step: Callable[[], Any], track: Sequence[torch.Tensor]) -> tuple[int, int | None]:
    """(absolute peak, live bytes above the tracked ones right after the forward) of one training step.

    The after-forward number (saved activations + loss) needs a step made by `run_step` (it has
    ``.forward``/``.zero``); for other callables it is None.
    """
    gc.collect()
    after_fw = None
    with _tracker(track) as t:
        start = t.current
        if hasattr(step, "forward"):
            step.zero()
            loss = step.forward()
            after_fw = t.current - start
            loss.backward()
            del loss
        else:
            step()
    return int(t.peak), after_fw


def run_step(
    model: torch.nn.Module, batch: Any, loss_fn: Callable | None = None
) -> Callable[[], torch.Tensor]:
    """A training step closure: grads to None, forward, loss, backward (no optimizer)."""

    def zero() -> None:
        for p in model.parameters():
            p.grad = None

    def forward() -> torch.Tensor:
        return forward_loss(model, batch, loss_fn)

    def step() -> torch.Tensor:
        zero()
        loss = forward()
        loss.backward()
        return loss.detach()

    step.zero, step.forward = zero, forward
    return step


class Autocast(torch.nn.Module):
    """``inner(**batch)`` under autocast to ``dtype`` on ``device_type`` (every forward casts the weights
    afresh, as a training loop does)."""

    def __init__(self, inner: torch.nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, **batch: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.inner(**batch)


def grads(params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


@dataclass
class Reference:
    """What the unmodified model gives after one step from its initial state: grads and buffers."""

    grads: list[torch.Tensor | None]
    buffers_before: list[torch.Tensor]
    buffers_after: list[torch.Tensor]


def reference_grads(
    step: Callable[[], Any], params: Sequence[torch.Tensor], seed: int, buffers: Sequence[torch.Tensor] = ()
) -> Reference:
    before = [b.detach().clone() for b in buffers]
    torch.manual_seed(seed)
    step()
    return Reference(grads(params), before, [b.detach().clone() for b in buffers])


def fresh_copy(model: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    """A deep copy, its parameter and buffer objects in the original's order (kept across later wrapping)."""
    m = copy.deepcopy(model)
    return m, list(m.parameters()), list(m.buffers())
