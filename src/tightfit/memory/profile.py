"""`profile` (measure a real training step) and `estimate` (the same step under FakeTensorMode).

Both run the identical procedure, so on a model that fits they agree exactly on saved bytes and peak:
  1. If the optimizer has no state yet, it takes one step on zero gradients to create it, so the
     measured step is a steady-state one (optimizer state is live during forward and backward).
  2. Gradients are set to None; one step runs under the live tracker, the saved-tensor counter and
     a FLOP counter: forward, loss, backward, optimizer step. The model output stays alive until the
     step ends, as in an ordinary training loop.
  3. `profile` then times `time_steps` more steps without any measurement overhead.

NOTE [ profile leaves everything as it found it ]
  `profile` trains the model itself (no copy: a copy would double the memory it measures and could not
  be made of a sharded model) and then restores, from a snapshot taken before step 1: parameters and
  buffers (copied back in place; the snapshot is kept in host memory), gradients (the same tensor
  objects), the optimizer's state and hyper-parameters (state it did not have is removed again), and
  the random number generators (CPU, the devices of the model and batch, every initialised CUDA
  device). The snapshot exists outside the measured step and is not counted.

NOTE [ Per rank ]
  Under an initialised process group each rank measures its own step: the report is this rank's
  (``rank``, ``world_size``), and ``ranks`` holds every rank's peak, where it happens and its peak per
  device, gathered from all ranks (a collective: every rank calls `profile`). Wrapped models count
  what a rank holds: FSDP2's sharded parameters, gradients and optimizer state as their local shards,
  gathered parameters while their storage is allocated (tightfit.memory.live NOTE 5).
  `estimate(..., world_size=N, parallel="fsdp2" | "ddp")` builds the same step for rank 0 of N under a
  fake process group (`tightfit.memory.distributed`); ``batch_factory`` gives one rank's batch.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from tightfit._rng import forked_rng
from tightfit._step import LossFn, call_model, check_batch, loss_of, training_step, wait_for_device
from tightfit._tree import tensors_of
from tightfit.errors import InvalidInput, NothingToTrain
from tightfit.memory.distributed import (
    PARALLEL,
    ddp_bucket_bytes,
    fake_process_group,
    gather_objects,
    parallelize_,
    rank_and_world,
)
from tightfit.memory.flops import FlopCounter
from tightfit.memory.live import LiveTracker, local_tensors, unique_bytes
from tightfit.memory.report import MemoryReport, ModuleMemory, RankPeak
from tightfit.memory.saved import SavedTensorCounter


def batch_tensors(batch: Any) -> list[torch.Tensor]:
    """The tensors a batch holds: those in a tensor/tuple/list/dict, or, for the model's own batch
    object (a dataclass, TensorDict, PyG ``Data``), those in its attributes (and the mappings and lists
    there), so that they count as inputs from the start of the step."""
    if isinstance(batch, (torch.Tensor, list, tuple, set, Mapping)):
        return list(tensors_of(batch))
    try:
        attrs = vars(batch)
    except TypeError:  # no __dict__ (slots)
        attrs = {name: getattr(batch, name, None) for name in getattr(batch, "__slots__", ())}
    return list(tensors_of(attrs))


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def _device_of(model: torch.nn.Module, batch: Any) -> torch.device:
    for t in list(model.parameters()) + batch_tensors(batch):
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


class _Snapshot:
    """What a training step changes, to put back afterwards (NOTE [ profile leaves everything ... ])."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.tensors = [(t, _host_copies(t)) for t in [*model.parameters(), *model.buffers()]]
        self.grads = [(p, p.grad) for p in model.parameters()]
        self.optimizer = optimizer
        self.state: dict[Any, dict[str, Any]] = {}
        self.groups: list[dict[str, Any]] = []
        if optimizer is not None:
            self.state = {
                p: {k: _host_copies(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                for p, st in optimizer.state.items()
            }
            self.groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    @torch.no_grad()
    def restore(self) -> None:
        for t, saved in self.tensors:
            _copy_back(t, saved)
        for p, grad in self.grads:
            p.grad = grad
        opt = self.optimizer
        if opt is None:
            return
        for p in [p for p in opt.state if p not in self.state]:
            del opt.state[p]  # created by the warm-up step (procedure step 1)
        for p, saved in self.state.items():
            current = opt.state[p]
            for k, v in saved.items():
                if isinstance(v, list):
                    _copy_back(current[k], v)
                else:
                    current[k] = v
        for group, saved_group in zip(opt.param_groups, self.groups):
            group.update(saved_group)


def _host_copies(t: torch.Tensor) -> list[torch.Tensor]:
    """Copies in host memory of the tensors holding ``t``'s values (its local shard for a DTensor)."""
    return [x.detach().to("cpu", copy=True) for x in local_tensors(t)]


def _copy_back(t: torch.Tensor, saved: list[torch.Tensor]) -> None:
    for local, copy in zip(local_tensors(t), saved):
        local.copy_(copy)


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
    autocast: contextlib.AbstractContextManager[Any] | None = None,
    held: Any = (),
) -> MemoryReport:
    """Procedure steps 1 and 2 (see the module docstring); ``held``: tensors a wrapper keeps through the
    step (DDP's gradient buckets in an estimate), counted from the start."""
    if optimizer is not None:
        ensure_optimizer_state(optimizer)
        optimizer.zero_grad(set_to_none=True)
    for p in model.parameters():  # also those the optimizer does not hold: backward adds into a .grad
        p.grad = None

    inputs = batch_tensors(batch)
    tracker = LiveTracker(track=[model, optimizer, inputs, held], root=model, timeline=timeline)
    with tracker, FlopCounter() as flop_counter:
        tracker.phase = "forward"
        with SavedTensorCounter(exclude=[model, inputs], root=model) as saved:
            del inputs  # not held through the step: a model may replace the tensors of its batch object
            with autocast if autocast is not None else contextlib.nullcontext():
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
    rank, world_size = rank_and_world()
    return MemoryReport(
        model=type(model).__name__,
        device=str(_device_of(model, batch)),
        estimated=estimated,
        params_bytes=unique_bytes(list(model.parameters())),
        buffers_bytes=unique_bytes(list(model.buffers())),
        grads_bytes=grads_bytes,
        optimizer_bytes=unique_bytes(optimizer) if optimizer is not None else 0,
        inputs_bytes=unique_bytes(batch_tensors(batch)),
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
        peak_by_device=dict(sorted(tracker.peak_by_device.items())),
        rank=rank,
        world_size=world_size,
    )


def _rank_peak(report: MemoryReport) -> RankPeak:
    return RankPeak(
        report.rank,
        report.peak_bytes,
        report.peak_phase,
        report.peak_op,
        report.peak_module,
        dict(report.peak_by_device),
    )


def profile(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    time_steps: int = 1,
    timeline: bool = False,
    gather_ranks: bool = True,
) -> MemoryReport:
    """Measure one training step of `model` on `batch` exactly: memory by category, peak and where it
    happens (in total and per device), saved activations per module, FLOPs and (median over `time_steps`
    extra steps) step time.

    A batch is passed as ``model(batch)``, ``model(*batch)`` or ``model(**batch)`` (tensor, tuple, dict);
    the loss is ``loss_fn(output)`` or found in the output (scalar, ``.loss``, first element).
    The model, its gradients, the optimizer and every random number generator are left as they were:
    the steps run on the model itself and a snapshot taken first is restored afterwards (see NOTE
    [ profile leaves everything as it found it ]). Under an initialised process group (DDP, FSDP2) the
    report is this rank's, with every rank's peak in ``report.ranks``: every rank must call it (a
    collective), or pass ``gather_ranks=False`` to report this rank alone.
    """
    _check_inputs(model, optimizer)
    check_batch(batch)
    if time_steps < 0:
        raise ValueError(f"time_steps must be >= 0, got {time_steps}")
    snapshot = _Snapshot(model, optimizer)
    try:
        with forked_rng([*model.parameters(), *batch_tensors(batch)]):
            report = _measure(model, batch, loss_fn, optimizer, estimated=False, timeline=timeline)
            times = []
            for _ in range(time_steps):
                wait_for_device()
                start = time.perf_counter()
                training_step(model, batch, loss_fn, optimizer)
                wait_for_device()
                times.append(time.perf_counter() - start)
    finally:
        snapshot.restore()
    report.step_time = statistics.median(times) if times else None
    report.ranks = gather_objects(_rank_peak(report)) if gather_ranks else [_rank_peak(report)]
    return report


@contextlib.contextmanager
def _module_conversions_on_fake_tensors() -> Iterator[None]:
    """Let ``module.to(dtype)`` / ``.double()`` work on fake parameters while estimating.

    ``nn.Module._apply`` swaps a fake parameter with its converted copy (``torch.utils.swap_tensors``),
    which refuses tensors that weak references point to, and FakeTensorMode keeps one to every tensor it
    converted (a cache for converting the same real tensor again). For the swap, the two tensors are
    dropped from that cache; the rest of the conversion is torch's own."""
    from torch._subclasses.fake_tensor import FakeTensor

    swap = torch.utils.swap_tensors

    def swap_fake(t1: torch.Tensor, t2: torch.Tensor) -> None:
        for t in (t1, t2):
            if isinstance(t, FakeTensor):
                memo = t.fake_mode.fake_tensor_converter.tensor_memo
                for key in [k for k, v in list(memo.items()) if v is t]:
                    del memo[key]
        swap(t1, t2)

    torch.utils.swap_tensors = swap_fake
    try:
        yield
    finally:
        torch.utils.swap_tensors = swap


def estimate(
    model_factory: Callable[[], torch.nn.Module],
    batch_factory: Callable[[], Any],
    loss_fn: LossFn | None = None,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer] | None = None,
    *,
    world_size: int = 1,
    parallel: str | None = None,
    device: str | torch.device | None = None,
    autocast: torch.dtype | None = None,
    timeline: bool = False,
) -> MemoryReport:
    """The `profile` report without allocating: model, batch and optimizer are built by the zero-argument
    factories (``optimizer_factory(model.parameters())``) under FakeTensorMode, for models larger than
    this machine. Same procedure, so saved bytes and peak equal `profile`'s; no step time.

    ``world_size=N, parallel="fsdp2" | "ddp"``: one rank's step of N (rank 0) under a fake process group
    (nothing communicates); ``batch_factory`` gives one rank's batch. FSDP2: the model is wrapped as
    `tightfit.memory.distributed.parallelize_` wraps it (``fully_shard`` per block, then the root). DDP:
    the plain step plus DDP's gradient buckets (as many bytes as the trainable parameters), which is
    what DDP adds to a rank's step that the dispatcher sees (tested against real DDP on gloo).
    ``device="cuda"``: the step of a CUDA GPU; on a machine without one the model is built on the CPU
    under `tightfit.memory.fakecuda.CudaDisguise` (attention takes the GPU's kernel; what is
    approximate is listed there) and the report names the GPU. ``autocast``: run the forward under
    autocast to this dtype (``torch.bfloat16``) on that device, as the training loop would.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise InvalidInput(f"world_size must be a positive int, got {world_size!r}")
    if parallel is not None and parallel not in PARALLEL:
        raise InvalidInput(f"parallel must be one of {', '.join(PARALLEL)} or None, got {parallel!r}")
    if world_size > 1 and parallel is None:
        raise InvalidInput(
            f"world_size={world_size} needs parallel='fsdp2' or 'ddp': how the model is spread over the ranks"
        )
    target = torch.device(device) if device is not None else None
    disguise = target is not None and target.type == "cuda" and not torch.cuda.is_available()
    if target is not None and target.type not in ("cpu", "cuda"):
        raise InvalidInput(f"device must be 'cpu' or 'cuda', got {str(target)!r}")
    with contextlib.ExitStack() as stack:
        mesh = stack.enter_context(fake_process_group(world_size)) if parallel is not None else None
        # constants a model keeps as real tensors (few-bit tables) join fake ones in ops
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(_module_conversions_on_fake_tensors())
        if disguise:
            from tightfit.memory.fakecuda import CudaDisguise

            stack.enter_context(CudaDisguise())  # its autocast: CPU autocast around the forward
        elif target is not None:
            stack.enter_context(target)
        model = model_factory()
        batch = batch_factory()
        _check_inputs(model, None)
        check_batch(batch)
        held: list[torch.Tensor] = []
        if parallel == "ddp":
            # DDP over the plain step: gradient buckets as large as the trainable parameters, held
            # for the whole step (its C++ constructor reads parameter data, which fake tensors lack)
            held.append(
                torch.empty(ddp_bucket_bytes(model), dtype=torch.uint8, device=_device_of(model, batch))
            )
        elif parallel is not None:
            model = parallelize_(model, parallel, mesh)
        optimizer = optimizer_factory(model.parameters()) if optimizer_factory is not None else None
        _check_inputs(model, optimizer)
        amp = None
        if autocast is not None:
            amp_device = "cpu" if disguise else (target or _device_of(model, batch)).type
            amp = torch.autocast(device_type=amp_device, dtype=autocast)
        report = _measure(
            model, batch, loss_fn, optimizer, estimated=True, timeline=timeline, autocast=amp, held=held
        )
    if disguise:
        gpu = f"cuda:{target.index or 0}"
        report.device = gpu
        report.peak_by_device = {gpu if k == "cpu" else k: v for k, v in report.peak_by_device.items()}
    report.parallel = parallel
    report.ranks = [_rank_peak(report)]
    return report
