"""`profile` (measure a real training step) and `estimate` (the same step under FakeTensorMode).

Both run the identical procedure, so on a model that fits they agree exactly on saved bytes and peak:
  1. If the optimizer has no state yet, it takes one step on zero gradients to create it, so the
     measured step is a steady-state one (optimizer state is live during forward and backward).
  2. Gradients are set to None; one step runs under the live tracker, the saved-tensor counter and
     a FLOP counter: forward, loss, backward, optimizer step. The model output stays alive until the
     step ends, as in an ordinary training loop.
  3. `profile` then times `time_steps` more steps without any measurement overhead.
Note that `profile` trains: the model's parameters and the optimizer state are updated.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from tightfit._step import LossFn, call_model, loss_of, training_step, wait_for_device
from tightfit._tree import storage_key, tensors_of
from tightfit.errors import InvalidInput, NothingToTrain
from tightfit.memory.flops import FlopCounter
from tightfit.memory.live import LiveTracker
from tightfit.memory.report import MemoryReport, ModuleMemory
from tightfit.memory.saved import SavedTensorCounter


def unique_bytes(objs: Any) -> int:
    """Bytes of the distinct storages behind the tensors in `objs` (modules, optimizers, containers)."""
    seen: dict[Any, int] = {}
    for t in tensors_of(objs):
        key = storage_key(t)
        if key is not None:
            seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def _device_of(model: torch.nn.Module, batch: Any) -> torch.device:
    for t in list(model.parameters()) + list(tensors_of(batch)):
        return t.device
    return torch.device("cpu")


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state with one step on zero gradients, if it has none (procedure step 1)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if not params or all(p in optimizer.state and optimizer.state[p] for p in params):
        return
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _check_inputs(model: Any, optimizer: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise InvalidInput(f"expected a torch.nn.Module to profile, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidInput(
            f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise NothingToTrain(
            "the model has no parameter that requires grad: there is no training step to measure"
        )


def _measure(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None,
    optimizer: torch.optim.Optimizer | None,
    *,
    estimated: bool,
    timeline: bool,
) -> MemoryReport:
    """Procedure steps 1 and 2 (see the module docstring)."""
    if optimizer is not None:
        ensure_optimizer_state(optimizer)
        optimizer.zero_grad(set_to_none=True)
    else:
        for p in model.parameters():
            p.grad = None

    tracker = LiveTracker(track=[model, optimizer, batch], root=model, timeline=timeline)
    with tracker, FlopCounter() as flop_counter:
        tracker.phase = "forward"
        with SavedTensorCounter(exclude=[model, batch], root=model) as saved:
            output = call_model(model, batch)
            loss = loss_of(output, loss_fn)
        if not loss.requires_grad:
            raise NothingToTrain(
                "the loss does not require grad: nothing to backpropagate "
                "(is torch.no_grad() active, or does the loss not depend on trainable parameters?)"
            )
        forward_live = tracker.current - tracker.baseline
        tracker.phase = "backward"
        loss.backward()
        grads_bytes = unique_bytes(_grads(model))
        if optimizer is not None:
            tracker.phase = "optimizer"
            optimizer.step()
        del output, loss

    module_paths = {path for path, _ in model.named_modules()}
    modules = [
        ModuleMemory(path, saved.per_module.get(path, 0), peaks.forward, peaks.backward)
        for path, peaks in tracker.module_peaks.items()
        if path in module_paths
    ]
    return MemoryReport(
        model=type(model).__name__,
        device=str(_device_of(model, batch)),
        estimated=estimated,
        params_bytes=unique_bytes(list(model.parameters())),
        buffers_bytes=unique_bytes(list(model.buffers())),
        grads_bytes=grads_bytes,
        optimizer_bytes=unique_bytes(optimizer) if optimizer is not None else 0,
        inputs_bytes=unique_bytes(batch),
        activations_bytes=saved.bytes,
        forward_live_bytes=forward_live,
        baseline_bytes=tracker.baseline,
        peak_bytes=tracker.peak,
        peak_phase=tracker.peak_phase,
        peak_op=tracker.peak_op,
        peak_module=tracker.peak_module,
        phase_peaks=dict(tracker.phase_peaks),
        per_module=dict(sorted(saved.per_module.items())),
        modules=modules,
        flops=flop_counter.total,
        step_time=None,
        timeline=tracker.timeline,
    )


def profile(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    time_steps: int = 1,
    timeline: bool = False,
) -> MemoryReport:
    """Measure one training step of `model` on `batch` exactly: memory by category, peak and where it
    happens, saved activations per module, FLOPs and (median over `time_steps` extra steps) step time.

    A batch is passed as ``model(batch)``, ``model(*batch)`` or ``model(**batch)`` (tensor, tuple, dict);
    the loss is ``loss_fn(output)`` or found in the output (scalar, ``.loss``, first element).
    This trains: the parameters are updated when an optimizer is given (see the module docstring).
    """
    _check_inputs(model, optimizer)
    if time_steps < 0:
        raise ValueError(f"time_steps must be >= 0, got {time_steps}")
    report = _measure(model, batch, loss_fn, optimizer, estimated=False, timeline=timeline)
    times = []
    for _ in range(time_steps):
        wait_for_device()
        start = time.perf_counter()
        training_step(model, batch, loss_fn, optimizer)
        wait_for_device()
        times.append(time.perf_counter() - start)
    report.step_time = statistics.median(times) if times else None
    return report


def estimate(
    model_factory: Callable[[], torch.nn.Module],
    batch_factory: Callable[[], Any],
    loss_fn: LossFn | None = None,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer] | None = None,
    *,
    timeline: bool = False,
) -> MemoryReport:
    """The `profile` report without allocating: model, batch and optimizer are built by the zero-argument
    factories (``optimizer_factory(model.parameters())``) under FakeTensorMode, for models larger than
    this machine. Same procedure, so saved bytes and peak equal `profile`'s; no step time."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = model_factory()
        batch = batch_factory()
        optimizer = optimizer_factory(model.parameters()) if optimizer_factory is not None else None
        _check_inputs(model, optimizer)
        return _measure(model, batch, loss_fn, optimizer, estimated=True, timeline=timeline)
