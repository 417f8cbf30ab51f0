"""Exact live-tensor memory on any device: a dispatch mode that sees every storage an op creates and a
finalizer on each storage that sees it die. No allocator statistics needed, so it works on CPU and under
FakeTensorMode (where nothing is allocated at all).

NOTE [ What the tracker counts ]
  1. A storage counts from the op that first returns it until its last view dies, at ``nbytes()``, on the
     device of the tensor that first showed it (``peak_by_device``: one peak per device, host included).
  2. Tensors that exist before the tracker starts count from the start when registered with
     ``track(...)``; an untracked one that an op writes into or views later (DDP's gradient buckets,
     made when DDP wraps the model) was live all along: it then counts from the start too (baseline,
     peaks and timeline so far are raised by its bytes).
  3. The peak is sampled after each op, so buffers an op allocates and frees inside its own kernel are
     not seen (the allocator-level profiler sees them); allocator rounding and caching are not modelled.
  4. Tensors made outside the dispatcher (``torch.from_numpy``, Inductor's own buffers, the 0-dim tensor
     autograd saves for ``x * 0.5``: 8 bytes made from the Python number) are not seen, except the CPU
     RNG state ``checkpoint`` stashes per region (5 KiB): ``torch.get_rng_state`` is wrapped while a
     tracker is active to count it (a 1000-step LSTM plan has hundreds of regions).
  5. Storages resized in place count at their new size, including ``UntypedStorage.resize_``, which does
     not go through the dispatcher: FSDP2 frees each gathered parameter with ``resize_(0)`` after use and
     re-grows it for the backward's all-gather. ``UntypedStorage.resize_`` is wrapped while a tracker
     is active, so a gathered parameter counts exactly while it holds memory.
     The two wrappers are process-wide, the tracker is not (a dispatch mode is thread-local): they are
     installed once, counted by the trackers active in any thread, and removed when the last one exits
     (in any order, also on an exception). A call reaches the trackers of the calling thread: those it
     entered and those on its dispatch-mode stack (autograd's device threads, which run a GPU backward,
     inherit the stack); another thread's resizes and RNG reads are not counted.
  6. Tensor subclasses that wrap others (DTensor: FSDP2's sharded parameters, gradients and optimizer
     state) count as the tensors inside them (a rank's local shard), and their ops are left to the
     subclass, which runs them as ops on those local tensors, which the tracker sees. The ops DTensor
     runs under its own fake mode to propagate shapes allocate nothing and are not counted.
  7. Observing changes the step a little: under any Python dispatch mode autograd accumulates some
     gradients out of place (an RNN's per-step gradients in checkpointed segments; measured by
     ``benchmarks/memory/ruler_vs_allocator.py``), so the peak counted is that of the observed step, an
     upper bound of the plain one. ``tightfit.memory.allocator_peak`` reads the plain step.
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _get_current_dispatch_mode_stack,
    is_traceable_wrapper_subclass,
)
from torch.utils._pytree import tree_leaves

from tightfit._tree import StorageKey, storage_id, storage_key, tensors_of
from tightfit.memory.modules import ModuleScope


@dataclass(frozen=True)
class TimelinePoint:
    """Live bytes right after one op."""

    index: int
    live_bytes: int
    phase: str
    op: str


@dataclass
class ModulePeaks:
    """Highest live bytes seen while a module ran, in its forward and in its backward."""

    forward: int = 0
    backward: int = 0


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def local_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``t``'s memory: ``t`` itself, or, for a wrapper subclass such as
    DTensor, the tensors inside it (a rank's local shard), recursively."""
    if type(t) in _PLAIN:
        return [t]
    if is_traceable_wrapper_subclass(t) and not isinstance(t, FakeTensor):
        names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
        inner = (getattr(t, name) for name in names)  # DTensor also flattens its (tensorless) mesh
        return [leaf for x in inner if isinstance(x, torch.Tensor) for leaf in local_tensors(x)]
    return [t]


def unique_bytes(objs: Any) -> int:
    """Bytes of the distinct storages behind the tensors in `objs` (modules, optimizers, containers);
    a DTensor counts as its local shard."""
    seen: dict[Any, int] = {}
    for t in tensors_of(objs):
        for local in local_tensors(t):
            key = storage_key(local)
            if key is not None:
                seen[key] = local.untyped_storage().nbytes()
    return sum(seen.values())


@functools.cache
def _desugared_types() -> tuple[type, ...]:
    """Subclasses whose ops the tracker leaves to the subclass (it runs them on local tensors)."""
    try:
        from torch.distributed.tensor import DTensor
    except (ImportError, RuntimeError):  # pragma: no cover - torch built without distributed
        return ()
    return (DTensor,)


_WAIT_TENSOR = torch.ops._c10d_functional.wait_tensor.default


def _backend_key(args: Any) -> Any:
    """The dispatch key of the kernel a collective on these tensors runs (CPU, CUDA), or None."""
    for a in tree_leaves(args):
        if isinstance(a, torch.Tensor) and type(a) is torch.Tensor:
            return {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA}.get(a.device.type)
    return None


def _returned_an_input(t: torch.Tensor, args: Any, kwargs: Any) -> bool:
    """Whether an op output with a storage not seen yet is an input, or a view of one (in-place, out=,
    view ops): such an op allocated nothing, so the storage was live before (NOTE 2). A view of another
    output of the same op (FSDP2's all-gather input, a slice of its output buffer) is no such case."""
    if not t._is_view() and not any(t is a for a in args) and not any(t is v for v in kwargs.values()):
        return False
    key = storage_key(t)
    return any(isinstance(a, torch.Tensor) and storage_key(a) == key for a in tree_leaves((args, kwargs)))


def _active_fake_mode() -> Any:
    """The FakeTensorMode active now, or None (the dispatcher's slot for it: cheap, read twice per op)."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)


@functools.lru_cache(maxsize=64)
def _device_name(device: torch.device) -> str:
    """'cpu', 'cuda:0', ...: the key of ``peak_by_device`` (an accelerator always with its index)."""
    if device.type in ("cpu", "meta") or device.index is not None:
        return str(device)
    return f"{device.type}:0"


# NOTE 5: the process-wide wrappers of torch.get_rng_state and UntypedStorage.resize_
_patch_lock = threading.Lock()
_patch_count = 0
_originals: dict[str, Any] = {}
_entered = threading.local()  # .trackers: the LiveTrackers this thread entered, innermost last


def _active_trackers() -> list[LiveTracker]:
    """The trackers a call in this thread reaches: entered here, or on its dispatch-mode stack."""
    found: list[LiveTracker] = list(getattr(_entered, "trackers", ()))
    for mode in _get_current_dispatch_mode_stack():
        if isinstance(mode, LiveTracker) and not any(mode is t for t in found):
            found.append(mode)
    return found


def _counted_get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    state = _originals["get_rng_state"](*args, **kwargs)
    for tracker in _active_trackers():
        tracker._register(state)
    return state


def _counted_resize(storage: torch.UntypedStorage, size: int) -> Any:
    out = _originals["resize_"](storage, size)
    for tracker in _active_trackers():
        if not tracker._under_subclass_fake_mode():
            tracker._count(storage)
            tracker._sample("UntypedStorage.resize_")
    return out


def _install(tracker: LiveTracker) -> None:
    global _patch_count
    with _patch_lock:
        if _patch_count == 0:
            _originals["get_rng_state"] = torch.get_rng_state
            _originals["resize_"] = torch.UntypedStorage.resize_
            torch.get_rng_state = _counted_get_rng_state
            torch.UntypedStorage.resize_ = _counted_resize  # type: ignore[method-assign]
        _patch_count += 1
    if not hasattr(_entered, "trackers"):
        _entered.trackers = []
    _entered.trackers.append(tracker)


def _uninstall(tracker: LiveTracker) -> None:
    global _patch_count
    trackers = getattr(_entered, "trackers", [])
    for i in range(len(trackers) - 1, -1, -1):
        if trackers[i] is tracker:
            del trackers[i]
            break
    with _patch_lock:
        _patch_count -= 1
        if _patch_count == 0:
            torch.get_rng_state = _originals.pop("get_rng_state")
            torch.UntypedStorage.resize_ = _originals.pop("resize_")  # type: ignore[method-assign]


class LiveTracker(TorchDispatchMode):
    """Track live tensor bytes: ``with LiveTracker(track=[model, batch, opt]) as t: step()``; ``t.peak``.

    ``peak`` is the highest total over every device; ``peak_by_device`` maps each device (``"cpu"``,
    ``"cuda:0"``) to the highest live bytes on that device alone (those peaks may fall at different ops),
    ``current_by_device`` the bytes live now. ``phase`` is a free-form label the caller sets ("forward",
    "backward", ...); the peak records it. With ``root=model`` the innermost running module of each op is
    known (``peak_module`` and per-module forward/backward peaks in ``module_peaks``). With
    ``timeline=True`` every op's live bytes are kept.
    """

    def __init__(
        self,
        track: Any = (),
        *,
        root: torch.nn.Module | None = None,
        timeline: bool = False,
    ) -> None:
        super().__init__()
        self._live: dict[StorageKey, tuple[int, str]] = {}
        self.current = 0
        self.peak = 0
        self.current_by_device: dict[str, int] = {}
        self.peak_by_device: dict[str, int] = {}
        self.peak_op: str | None = None
        self.peak_phase: str | None = None
        self.peak_module: str | None = None
        self.phase = "run"
        self.ops = 0
        self.baseline = 0
        self.timeline: list[TimelinePoint] | None = [] if timeline else None
        self.module_peaks: dict[str, ModulePeaks] = {}
        self.phase_peaks: dict[str, int] = {}
        self._scope = ModuleScope(root) if root is not None else None
        self._tracked_before = list(tensors_of(track)) if track is not None else []
        self._fake_mode_on_entry: Any = None
        self._desugared = _desugared_types()

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Without this, dynamo skips compiled frames under the mode: the model would run eagerly.
        return True

    # -- registration -------------------------------------------------------------------------------
    def track(self, objs: Any) -> None:
        """Count tensors that already exist (parameters, optimizer state, inputs) from now on."""
        for t in tensors_of(objs):
            self._register(t)
        self._sample("<track>")

    def _register(self, t: torch.Tensor, op: tuple[Any, Any] | None = None) -> None:
        """Count ``t``'s storage; ``op``: (args, kwargs) of the op that returned it, when it did."""
        for local in local_tensors(t):
            if local.layout != torch.strided:
                continue
            try:
                st = local.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            key = storage_id(st)
            known = self._live.get(key)
            if known is None:
                if op is not None and _returned_an_input(local, *op):
                    self._discovered(key, st, st.nbytes(), _device_name(local.device))
                else:
                    self._new(key, st, st.nbytes(), _device_name(local.device))
            elif known[0] != st.nbytes():  # resized in place (resize_, set_, out=)
                self._count(st)

    def _count(self, st: torch.UntypedStorage, device: str | None = None) -> None:
        """Count storage `st` at its current size (new, or resized in place by resize_, set_, out=)."""
        key = storage_id(st)
        nbytes = st.nbytes()
        known = self._live.get(key)
        if known is None:
            if device is None:
                # a storage first seen through resize_: its own device, except under fake tensors,
                # whose storages are meta: then the device holding most of what was tracked
                device = _device_name(st.device)
                if device == "meta" and self._fake_mode_on_entry is not None:
                    device = max(self.current_by_device, key=self.current_by_device.get, default="meta")
            self._new(key, st, nbytes, device)
        elif known[0] != nbytes:
            self._live[key] = (nbytes, known[1])
            self._add(known[1], nbytes - known[0])

    def _new(self, key: StorageKey, st: torch.UntypedStorage, nbytes: int, device: str) -> None:
        self._live[key] = (nbytes, device)
        self._add(device, nbytes)
        weakref.finalize(st, self._free, key)

    def _discovered(self, key: StorageKey, st: torch.UntypedStorage, nbytes: int, device: str) -> None:
        """A storage live since before the tracker started, untracked, seen now: it counts from the start
        (baseline, and every peak and sample so far)."""
        self._new(key, st, nbytes, device)
        self.baseline += nbytes
        if self.ops:
            self.peak += nbytes
            self.peak_by_device[device] = self.peak_by_device.get(device, 0) + nbytes
            self.phase_peaks = {k: v + nbytes for k, v in self.phase_peaks.items()}
            for peaks in self.module_peaks.values():
                peaks.forward += nbytes if peaks.forward else 0
                peaks.backward += nbytes if peaks.backward else 0
            if self.timeline is not None:
                self.timeline = [
                    TimelinePoint(p.index, p.live_bytes + nbytes, p.phase, p.op) for p in self.timeline
                ]

    def _add(self, device: str, nbytes: int) -> None:
        self.current += nbytes
        self.current_by_device[device] = self.current_by_device.get(device, 0) + nbytes

    def _free(self, key: StorageKey) -> None:
        known = self._live.pop(key, None)
        if known is not None:
            self._add(known[1], -known[0])

    # -- sampling -----------------------------------------------------------------------------------
    def _sample(self, op: str) -> None:
        self.ops += 1
        module = self._scope.innermost() if self._scope is not None else None
        if self.current > self.peak:
            self.peak = self.current
            self.peak_op = op
            self.peak_phase = self.phase
            self.peak_module = module
        for device, nbytes in self.current_by_device.items():
            if nbytes > self.peak_by_device.get(device, -1):
                self.peak_by_device[device] = nbytes
        if self.current > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = self.current
        if self._scope is not None:
            backward = self._scope.in_backward
            for path in self._scope.active:
                peaks = self.module_peaks.setdefault(path, ModulePeaks())
                if backward:
                    peaks.backward = max(peaks.backward, self.current)
                else:
                    peaks.forward = max(peaks.forward, self.current)
        if self.timeline is not None:
            self.timeline.append(TimelinePoint(self.ops, self.current, self.phase, op))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        desugared = self._desugared
        if desugared and any(issubclass(t, desugared) for t in types):
            return NotImplemented  # DTensor runs it as ops on local tensors, which come back here
        kwargs = kwargs or {}
        if func is _WAIT_TENSOR and _active_fake_mode() is not None:
            # eager wait_tensor returns its input; its fake (meta) kernel returns a new tensor instead
            out = args[0]
        elif func.namespace == "c10d" and (backend := _backend_key(args)) is not None:
            # a collective's own buffers (gloo stages data in temporaries) are ops its kernel runs:
            # call the kernel directly, with this mode active again, so they are seen
            TorchDispatchMode.__enter__(self)
            try:
                out = func._op_dk(backend, *args, **kwargs)
            finally:
                TorchDispatchMode.__exit__(self, None, None, None)
        else:
            out = func(*args, **kwargs)
        if self._under_subclass_fake_mode():
            return out  # a subclass's shape propagation under its own fake mode: nothing allocated
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._register(t, (args, kwargs))
        self._sample(str(func))
        return out

    def __enter__(self) -> LiveTracker:
        self._fake_mode_on_entry = _active_fake_mode()
        if self._scope is not None:
            self._scope.__enter__()
        super().__enter__()
        # checkpoint stashes the CPU RNG state (5 KiB) per region, and FSDP2 frees and re-grows gathered
        # parameters with UntypedStorage.resize_: both outside the dispatcher (NOTE 4, 5)
        _install(self)
        for t in self._tracked_before:
            self._register(t)
        self._tracked_before = []
        self.baseline = self.current
        self._sample("<start>")
        return self

    def _under_subclass_fake_mode(self) -> bool:
        """Whether a subclass (DTensor) is propagating shapes under its own fake mode now: its ops and
        resizes allocate nothing and are not counted (NOTE 6)."""
        return _active_fake_mode() is not self._fake_mode_on_entry

    def __exit__(self, *exc: object) -> None:
        try:
            _uninstall(self)
        finally:
            try:
                super().__exit__(*exc)
            finally:
                if self._scope is not None:
                    self._scope.__exit__(*exc)
