"""The budget on any training loop: plan on the first training forward, re-plan on a larger shape.

    hook = tightfit.integrations.attach(model, "300MiB", optimizer=opt)   # the loop stays as it is
    ...
    hook.remove()

    with tightfit.integrations.attach(model, "300MiB", optimizer=opt):    # or: removed however it ends
        ...

``attach`` registers a forward pre-hook on ``model``. On a training forward (train mode, autograd on) it
calls ``ShapePlans.prepare`` with the call's arguments as the batch: the first call plans (measuring
training steps on that batch, with the model, optimizer, gradients and RNGs restored afterwards), later
calls switch to the plan of a covering shape or plan a larger one (``tightfit.integrations.shapes``).
Evaluation (eval mode or ``torch.no_grad()``) runs the original code and is never planned.

``StepMeter`` measures the live-tensor peak of each training step with the ruler
(``tightfit.memory.LiveTracker``), leaving planning out: planning measures the step without a plan, which
is what it costs, not what the planned step costs.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from tightfit._step import LossFn
from tightfit.errors import UserError
from tightfit.integrations.shapes import ShapePlans
from tightfit.memory import LiveTracker
from tightfit.memory.distributed import ddp_bucket_bytes
from tightfit.remat.config import RematConfig

__all__ = ["BudgetHook", "StepMeter", "attach", "batch_of_call", "grad_bytes"]


def grad_bytes(model: torch.nn.Module) -> int:
    """Bytes of the gradients of ``model``'s trainable parameters (what accumulation keeps alive): the
    count of `tightfit.memory.distributed.ddp_bucket_bytes`."""
    return ddp_bucket_bytes(model)


def batch_of_call(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """The batch in the ``tightfit._step`` convention that repeats this call: a dict of keyword
    arguments, a tuple of positional ones, or a dict binding both through ``forward``'s signature."""
    if not args:
        return dict(kwargs)
    if not kwargs:
        return args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else tuple(args)
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise UserError(
            f"cannot repeat a call of {type(module).__name__} with positional and keyword arguments "
            f"({exc}); call the model with keyword arguments only, or positional only"
        ) from exc
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in bound.signature.parameters.values()):
        raise UserError(
            f"{type(module).__name__}.forward takes *args/**kwargs: call it with keyword arguments only, "
            "or positional only, so that tightfit can repeat the call when planning"
        )
    return dict(bound.arguments)


class StepMeter:
    """The ruler's live-tensor peak of training steps, with pauses (planning is left out).

    ``start(track)`` opens a step, ``pause()``/``resume(track)`` leave a stretch out, ``stop()`` closes it
    and appends its peak (bytes) to ``peaks``. Tensors that exist when a stretch starts count only when in
    ``track`` (model: parameters, buffers, gradients; optimizer: its state; batches via ``add``).
    """

    def __init__(self) -> None:
        self.peaks: list[int] = []
        self._tracker: LiveTracker | None = None
        self._peak = 0
        self._track: list[Any] = []
        self.running = False

    def start(self, track: Sequence[Any]) -> None:
        if self.running:
            self.stop()
        self._track = list(track)
        self._peak = 0
        self.running = True
        self.resume()

    def add(self, obj: Any) -> None:
        """Count ``obj``'s tensors (a batch made before the step began) from now on."""
        self._track.append(obj)
        if self._tracker is not None:
            self._tracker.track(obj)

    def pause(self) -> None:
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self._peak = max(self._peak, self._tracker.peak)
            self._tracker = None

    def resume(self) -> None:
        if self.running and self._tracker is None:
            self._tracker = LiveTracker(track=self._track)
            self._tracker.__enter__()

    def stop(self) -> int:
        self.pause()
        self.running = False
        self.peaks.append(self._peak)
        self._track = []
        return self._peak


class BudgetHook:
    """A forward pre-hook keeping ``model`` within ``plans.budget`` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, plans: ShapePlans, meter: StepMeter | None = None) -> None:
        self.model = model
        self.plans = plans
        self.meter = meter
        self._busy = False
        self._handle = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._busy or not module.training or not torch.is_grad_enabled():
            return None
        batch = batch_of_call(module, args, kwargs)
        self._busy = True
        if self.meter is not None:
            self.meter.pause()
        try:
            self.plans.prepare(batch)
        finally:
            self._busy = False
            if self.meter is not None:
                self.meter.resume()
        if self.meter is not None and self.meter.running:
            self.meter.add(batch)
        return None

    def remove(self, undo: bool = True) -> None:
        """Remove the hook; with ``undo`` also the applied plan and lossy conversions."""
        self._handle.remove()
        if undo:
            self.plans.remove()

    def __enter__(self) -> BudgetHook:
        return self

    def __exit__(self, *exc: object) -> None:
        """``with attach(...):`` removes the hook, the plan and the conversions however the block ends."""
        self.remove()


def attach(
    model: torch.nn.Module,
    budget: int | float | str,
    *,
    allow: str | Sequence[str] = ("recompute",),
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    config: RematConfig | None = None,
    on_new_shape: str = "replan",
    grad_accumulation: int = 1,
) -> BudgetHook:
    """Keep every training step of ``model`` within ``budget`` (bytes or a size such as ``"2GiB"``).

    Plans on the first training forward and on every larger batch shape (``on_new_shape``: "replan",
    "warn", "error"); ``allow`` names the techniques plans may use ("recompute": lossless). With
    ``grad_accumulation`` > 1 the trainable gradients' bytes are reserved out of the budget. Returns the
    hook (``hook.plans``: the plans; ``hook.remove()``), also a context manager that removes it on exit.
    """
    if not isinstance(grad_accumulation, int) or grad_accumulation < 1:
        raise UserError(f"grad_accumulation must be a positive int, got {grad_accumulation!r}")
    plans = ShapePlans(
        model,
        budget,
        allow=allow,
        loss_fn=loss_fn,
        optimizer=optimizer,
        config=config,
        on_new_shape=on_new_shape,
        reserve=grad_bytes(model) if grad_accumulation > 1 else 0,
    )
    return BudgetHook(model, plans)
