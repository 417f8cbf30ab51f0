"""One training step, the same way everywhere (ruler, planner, benchmarks): call, loss, backward, step.

A *batch* is what the model takes: a tensor is passed as ``model(batch)``, a tuple/list as
``model(*batch)``, a dict as ``model(**batch)``, any other object (a dataclass, TensorDict) as
``model(batch)``. The loss is ``loss_fn(output)`` when given; otherwise the
output itself if it is a scalar tensor, its ``.loss`` (Hugging Face outputs), or its first element.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from tightfit.errors import InvalidInput, LossError

LossFn = Callable[[Any], torch.Tensor]


@functools.cache
def _accelerator_sync() -> Callable[[], None] | None:
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6
    if acc is not None:
        return acc.synchronize if acc.is_available() else None
    return torch.cuda.synchronize if torch.cuda.is_available() else None


def wait_for_device() -> None:
    """Block until the accelerator (CUDA, XPU, MPS) has run all queued work, so wall-clock timings cover it.

    Kernels on an accelerator run asynchronously; without this a timer measures only the launches. A
    no-op on a machine without an accelerator."""
    sync = _accelerator_sync()
    if sync is not None:
        sync()


BATCH_FORMS = (
    "a tensor (model(batch)), a tuple/list of arguments (model(*batch)), or a dict / Mapping such as a "
    "Hugging Face BatchEncoding of keyword arguments (model(**batch)), holding at least one tensor, or "
    "the model's own batch object (a dataclass, TensorDict: model(batch))"
)


def _holds_tensor(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, (tuple, list)):
        return any(_holds_tensor(v) for v in x)
    if isinstance(x, Mapping):
        return any(_holds_tensor(v) for v in x.values())
    return False


def check_batch(batch: Any) -> None:
    """Raise `InvalidInput` naming the accepted forms when ``batch`` is plainly none of them (a string,
    bytes, a number, None, a tuple/list/dict without any tensor), before the model sees it and fails
    somewhere inside. Any other object (a dataclass, TensorDict, PyG ``Data``) is the model's own batch
    type and is passed as ``model(batch)``."""
    if isinstance(batch, (torch.Tensor, tuple, list, Mapping)):
        if _holds_tensor(batch):
            return
    elif not isinstance(batch, (str, bytes, bytearray, int, float, complex, bool)) and batch is not None:
        return
    raise InvalidInput(f"a batch must be {BATCH_FORMS}; got {type(batch).__name__} {_preview(batch)}")


def _preview(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def call_model(model: Callable[..., Any], batch: Any) -> Any:
    """Run the forward pass on a batch given as a tensor, a tuple/list or a dict of arguments, or the
    model's own batch object (`check_batch` refuses strings, numbers, None and empty containers with
    `InvalidInput` before the model runs)."""
    check_batch(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def loss_of(output: Any, loss_fn: LossFn | None = None) -> torch.Tensor:
    """The scalar to backpropagate from a model output; raise a clear error when there is none."""
    if loss_fn is not None:
        loss = loss_fn(output)
    elif isinstance(output, torch.Tensor):
        loss = output
    elif getattr(output, "loss", None) is not None:
        loss = output.loss
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        loss = output[0]
    else:
        raise LossError(
            f"cannot find a loss in the model output of type {type(output).__name__}: pass "
            "loss_fn=lambda output: <scalar tensor>, or return a scalar / an object with .loss"
        )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise LossError(f"the loss must be a scalar tensor, got {shape}; pass a loss_fn that reduces it")
    return loss.reshape(())


def forward_loss(model: Callable[..., Any], batch: Any, loss_fn: LossFn | None = None) -> torch.Tensor:
    """Forward pass and loss."""
    return loss_of(call_model(model, batch), loss_fn)


def training_step(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> torch.Tensor:
    """Forward, backward and (if given) optimizer step; the gradients of every parameter of the model and
    of the optimizer are set to None first (a parameter the optimizer does not hold keeps no gradient
    that backward would add into in place). Returns the loss."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad = None
    loss = forward_loss(model, batch, loss_fn)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return loss.detach()
