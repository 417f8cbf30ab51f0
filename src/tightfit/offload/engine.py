"""The offload mechanism: which saved tensors move, when they leave the device, when they come back.

An `Offloader` is one model's offloading state: a host pool, a `Target` and the groups of saved tensors
of the steps in progress. ``with offloader.block(name):`` around a block's forward makes what that call
saves for backward one *group* (``saved_tensors_hooks`` pushed for the call only, so what the glue code
and the head save is never touched). Tensors are handled per storage (a saved view keeps its whole base
storage alive, so that is what moves; two saved tensors on one storage move once and come back as views
of one storage).

NOTE [ Lifecycle of a group ]
  1. forward, block i runs: its eligible saved storages become entries (still on the device);
  2. block i+keep_last starts (or block i ends, when keep_last is 0): every entry of group i starts its
     copy to a host buffer on the side stream; the entry keeps its device storage;
  3. the copy's event completes (polled at each block boundary; when more than ``max_in_flight`` groups
     are copying, the forward waits for the oldest): the entry drops its device storage, which frees it
     unless something else holds it;
  4. backward: the first time a tensor of group i is unpacked, the backward of block i has started: group
     i is fetched (if not already) and groups i-1 ... i-prefetch start coming back on the side stream;
     an unpack makes the compute stream wait for its entry's copy event, never the host;
  5. groups never copied when the backward starts (the last ``keep_last``) stay on the device;
  6. an entry belongs to the autograd graph (the packed handles hold it): when the graph is freed (after
     the backward, or when a failed forward's partial graph is dropped) its host buffer returns to the
     pool, after any copy still running into it has finished.
Nothing is left hooked after a block's call, even one that raised: the hooks are pushed and popped
around each call.

NOTE [ What never moves ] (`Offloader.reason`): tensors not on the target's device; ``nn.Parameter``
objects and views of them (FSDP2's gathered parameters are real Parameters); storages of the parameters
and buffers the offloader was told to protect; parameter casts (autocast's cached low-precision weights:
the cache keeps them alive, so moving them frees nothing); storages under ``min_bytes``.

NOTE [ Checkpoints ]: inside a non-reentrant ``torch.utils.checkpoint`` region the checkpoint's hooks are
innermost and win, so around a checkpointed block only what the checkpoint keeps (its inputs) is offloaded.
A block scope opened inside a checkpoint region (the block itself is checkpointed from outside) or in the
backward (a checkpoint recomputing the block) does nothing: offloading tensors the checkpoint will drop
and recompute would only add copies.
"""

from __future__ import annotations

import collections
import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tightfit._tree import StorageKey, storage_key, tensors_of
from tightfit.errors import UserError
from tightfit.offload.config import Offload
from tightfit.offload.target import Target
from tightfit.sizes import format_size

__all__ = ["HostBudgetExceeded", "HostPool", "NestedOffload", "Offloader", "OffloadStats"]


class HostBudgetExceeded(UserError, RuntimeError):
    """The host pool would grow past ``Offload.max_host_bytes``."""


class NestedOffload(UserError, RuntimeError):
    """An offload region or block scope was opened inside another one."""


class HostPool:
    """Exact-size host buffers, reused across steps (a buffer of the same size is taken when free).

    ``bytes`` is what the pool holds (free and in use), ``in_use`` what entries hold now, ``allocations``
    how many buffers were ever allocated. With ``max_bytes``, free buffers of other sizes are released to
    make room before the pool refuses to grow.
    """

    def __init__(self, target: Target, max_bytes: int | None = None) -> None:
        self.target = target
        self.max_bytes = max_bytes
        self._free: dict[int, list[torch.Tensor]] = {}
        self.bytes = 0
        self.in_use = 0
        self.peak_in_use = 0
        self.allocations = 0

    def take(self, nbytes: int, what: str = "") -> torch.Tensor:
        free = self._free.get(nbytes)
        if free:
            buf = free.pop()
        else:
            if self.max_bytes is not None and self.bytes + nbytes > self.max_bytes:
                self._release_free(self.bytes + nbytes - self.max_bytes)
            if self.max_bytes is not None and self.bytes + nbytes > self.max_bytes:
                raise HostBudgetExceeded(
                    f"offload needs {format_size(self.in_use + nbytes)} of host memory for the tensors "
                    f"in flight{what} but Offload.max_host_bytes is {format_size(self.max_bytes)}; raise "
                    "max_host_bytes, offload fewer blocks (filter_fn=, blocks=) or a smaller batch"
                )
            buf = self.target.alloc_host(nbytes)
            self.bytes += nbytes
            self.allocations += 1
        self.in_use += nbytes
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return buf

    def give_back(self, buf: torch.Tensor) -> None:
        self.in_use -= buf.numel()
        self._free.setdefault(buf.numel(), []).append(buf)

    def _release_free(self, need: int) -> None:
        for size in sorted(self._free, reverse=True):
            while self._free[size] and need > 0:
                self.target.free_host(self._free[size].pop())
                self.bytes -= size
                need -= size

    def free_buffers(self) -> list[torch.Tensor]:
        """The buffers not in use (e.g. to count them as existing memory with a `LiveTracker`)."""
        return [b for bufs in self._free.values() for b in bufs]

    def release(self) -> None:
        """Free every buffer not in use (a later step allocates again)."""
        self._release_free(self.bytes)
        self._free = {k: v for k, v in self._free.items() if v}

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the process frees the memory anyway
            pass


@dataclass
class OffloadStats:
    """Counts of the steps so far (``reset_stats()`` clears them)."""

    groups: int = 0  # block calls that opened a group
    offloaded: int = 0  # storages copied to the host
    offloaded_bytes: int = 0
    restored: int = 0  # storages copied back to the device
    restored_bytes: int = 0
    kept: int = 0  # eligible storages that stayed (last blocks, copy not landed before the backward)
    kept_bytes: int = 0
    skipped_bytes: dict[str, int] = field(default_factory=dict)  # reason -> bytes of saved tensors
    skipped_calls: int = 0  # block calls in a checkpoint region or a recompute (nothing done)
    waits: int = 0  # forwards that blocked on a copy (more than max_in_flight groups copying)


class _Entry:
    """One offloaded storage; owned by the packed handles (so by the autograd graph)."""

    __slots__ = ("__weakref__", "group", "nbytes", "storage", "host", "d2h", "restored", "restored_ref",
                 "h2d", "handles", "unpacked", "was_kept")

    def __init__(self, group: int, storage: torch.UntypedStorage) -> None:
        self.group = group
        self.nbytes = storage.nbytes()
        self.storage: torch.UntypedStorage | None = storage  # the device copy, until the host copy landed
        self.host: torch.Tensor | None = None
        self.d2h: Any = None
        self.restored: torch.UntypedStorage | None = None  # fetched back, until every handle unpacked
        self.restored_ref: weakref.ref | None = None
        self.h2d: Any = None
        self.handles = 0
        self.unpacked = 0
        self.was_kept = False


class _Packed:
    """What autograd holds instead of a saved tensor: the entry and how the tensor views its storage."""

    __slots__ = ("entry", "dtype", "offset", "size", "stride", "device")

    def __init__(self, entry: _Entry, t: torch.Tensor) -> None:
        self.entry = entry
        self.dtype = t.dtype
        self.offset = t.storage_offset()
        self.size = t.size()
        self.stride = t.stride()
        self.device = t.device


class _Group:
    __slots__ = ("index", "name", "entries", "state", "fetched", "started", "events")

    def __init__(self, index: int, name: str) -> None:
        self.index = index
        self.name = name
        self.entries: list[weakref.ref[_Entry]] = []
        self.state = "open"  # open -> waiting -> copying -> landed | kept
        self.fetched = False  # its copies back to the device were issued
        self.started = False  # its backward has started (a tensor of it was unpacked)
        self.events: list[Any] = []

    def live(self) -> list[_Entry]:
        return [e for e in (r() for r in self.entries) if e is not None]


def _finish(target: Target, pool: HostPool, event: Any, host: torch.Tensor) -> None:
    """An entry died: its host buffer goes back to the pool once the copy into it has finished."""
    if event is not None:
        target.synchronize(event)
    pool.give_back(host)


def _graph_task() -> int:
    """-1 outside the backward; the running graph task's id inside it (a checkpoint's recompute)."""
    return getattr(torch._C, "_current_graph_task_id", lambda: -1)()


def _checkpoint_hooks_active() -> bool:
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return top is not None and getattr(top[0], "__module__", "") == "torch.utils.checkpoint"


def _parameter_cast(t: torch.Tensor) -> bool:
    """Whether `t` is a view or a dtype/device cast of an nn.Parameter (autocast's cached weights)."""
    base = t._base if t._base is not None else t
    if isinstance(base, torch.nn.Parameter):
        return True
    fn = base.grad_fn
    for _ in range(3):
        if fn is None or len(fn.next_functions) != 1:
            return False
        name = type(fn).__name__
        if not (name.startswith("ToCopyBackward") or name.startswith("TBackward")
                or name.startswith("ViewBackward") or name.startswith("PermuteBackward")):
            return False
        fn = fn.next_functions[0][0]
        variable = getattr(fn, "variable", None)
        if variable is not None:
            return isinstance(variable, torch.nn.Parameter)
    return False


class Offloader:
    """One model's offloading: ``with offloader.block("h.3"): y = block(x)`` offloads what the call saves.

    ``protect`` (a module, tensors, ...): tensors whose storages never move (the model's parameters and
    buffers). ``dry_run=True`` moves nothing and only counts what would move (``planned``: (group name,
    bytes) per block call; ``planned_tensors``: storages per call): the estimate. ``trace=True`` records
    ("d2h" | "fetch" | "unpack", group index) events in ``trace`` for tests.
    """

    def __init__(
        self,
        config: Offload | None = None,
        target: Target | None = None,
        *,
        protect: Any = (),
        dry_run: bool = False,
        trace: bool = False,
    ) -> None:
        if target is None:
            raise ValueError("Offloader needs a Target (CudaTarget, or SimulatedTarget for tests)")
        self.config = config if config is not None else Offload()
        self.target = target
        self.pool = HostPool(target, self.config.max_host_bytes)  # type: ignore[arg-type]
        self.dry_run = dry_run
        self.stats = OffloadStats()
        self.trace: list[tuple[str, int]] | None = [] if trace else None
        self.planned: list[tuple[str, int]] = []  # dry run: (group name, bytes that would move)
        self.planned_tensors: list[int] = []  # dry run: storages that would move, per group
        self._protected: set[StorageKey] = set()
        self.protect(protect)
        self._groups: dict[int, _Group] = {}
        self._next = 0
        self._open: _Group | None = None
        self._waiting: collections.deque[_Group] = collections.deque()
        self._copying: collections.deque[_Group] = collections.deque()
        self._by_key: dict[StorageKey, weakref.ref[_Entry]] = {}
        self._in_backward = False
        self._step_start = 0

    # -- configuration ------------------------------------------------------------------------------
    def protect(self, objs: Any) -> None:
        """Never move the storages of these tensors (modules: their parameters, buffers and grads)."""
        for t in tensors_of(objs):
            key = storage_key(t)
            if key is not None:
                self._protected.add(key)

    @property
    def host_bytes(self) -> int:
        """Host memory the pool holds (free buffers included)."""
        return self.pool.bytes

    def reset_stats(self) -> None:
        self.stats = OffloadStats()
        if self.trace is not None:
            self.trace.clear()

    def _note(self, what: str, index: int) -> None:
        if self.trace is not None:
            self.trace.append((what, index))

    # -- which tensors move -------------------------------------------------------------------------
    def reason(self, t: torch.Tensor) -> str | None:
        """Why `t` stays on the device (NOTE [ What never moves ]), or None when it would be offloaded."""
        if not self.target.accepts(t):
            return "not on the offload device"
        if isinstance(t, torch.nn.Parameter) or _parameter_cast(t):
            return "parameter"
        key = storage_key(t)
        if key is None:
            return "no plain storage"
        if key in self._protected:
            return "parameter or buffer storage"
        if t.untyped_storage().nbytes() < max(self.config.min_bytes, 1):  # type: ignore[operator]
            return "under min_bytes"
        return None

    # -- the block scope ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def block(self, name: str = "") -> Iterator[None]:
        """Offload what the code inside saves for backward, as one group (one block's call).

        Does nothing under ``torch.no_grad`` (nothing is saved), inside a checkpoint region, or in the
        backward (a recompute). Raises `NestedOffload` inside another block scope of this offloader.
        """
        group = self._enter(name)
        if group is None:
            yield
            return
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        ok = False
        try:
            with hooks:
                yield
            ok = True
        finally:
            self._exit(group, ok)

    @torch.compiler.disable  # bookkeeping in Python: never traced into a compiled graph
    def _enter(self, name: str) -> _Group | None:
        """Open a group for a block call, or return None where the call offloads nothing."""
        if not torch.is_grad_enabled() or _graph_task() != -1 or _checkpoint_hooks_active():
            if torch.is_grad_enabled():
                self.stats.skipped_calls += 1
            return None
        if self._open is not None:
            raise NestedOffload(
                f"offload block scope {name!r} opened inside block {self._open.name!r}: block scopes do not "
                "nest; offload either the outer block or its parts"
            )
        self._start_block()
        group = _Group(self._next, name)
        self._next += 1
        self._groups[group.index] = group
        self._open = group
        self.stats.groups += 1
        return group

    @torch.compiler.disable
    def _exit(self, group: _Group, ok: bool) -> None:
        self._open = None
        if ok:
            self._end_block(group)
        else:  # a failed call: its partial graph owns the entries; nothing to copy
            group.state = "landed"

    def _start_block(self) -> None:
        if self._in_backward:  # a new forward after a backward: a new step
            self._in_backward = False
            self._step_start = self._next  # storages are shared between groups of one step only
            for key in [k for k, r in self._by_key.items() if r() is None]:
                del self._by_key[key]
        self._prune()
        while self._waiting and len(self._waiting) >= self.config.keep_last:
            self._copy_out(self._waiting.popleft())
        self._poll()

    def _end_block(self, group: _Group) -> None:
        if self.dry_run:
            live = group.live()
            self.planned.append((group.name, sum(e.nbytes for e in live)))
            self.planned_tensors.append(len(live))
            group.state = "landed"
            return
        group.state = "waiting"
        self._waiting.append(group)
        while len(self._waiting) > self.config.keep_last:
            self._copy_out(self._waiting.popleft())
        self._poll()

    # -- forward: pack, copy out, land ----------------------------------------------------------------
    @torch.compiler.disable  # bookkeeping in Python: never traced into a compiled graph
    def _pack(self, t: torch.Tensor) -> Any:
        group = self._open
        why = self.reason(t)
        if why is not None or group is None:
            if why is not None:
                skipped = self.stats.skipped_bytes
                nbytes = t.untyped_storage().nbytes() if storage_key(t) is not None else 0
                skipped[why] = skipped.get(why, 0) + nbytes
            return t
        storage = t.untyped_storage()
        key = storage_key(t)
        ref = self._by_key.get(key)  # type: ignore[arg-type]
        entry = ref() if ref is not None else None
        if entry is None or entry.group < self._step_start:
            entry = _Entry(group.index, storage)
            group.entries.append(weakref.ref(entry))
            self._by_key[key] = weakref.ref(entry)  # type: ignore[index]
            weakref.finalize(storage, self._by_key.pop, key, None)  # keys are unique only while alive
        entry.handles += 1
        if self.dry_run:
            # count the storage, keep the tensor: nothing moves
            return (t, entry)
        return _Packed(entry, t)

    def _copy_out(self, group: _Group) -> None:
        entries = group.live()
        for entry in entries:
            if entry.storage is None or entry.host is not None:
                continue
            host = self.pool.take(entry.nbytes, f" (block {group.name!r})" if group.name else "")
            entry.host = host
            entry.d2h = self.target.to_host(entry.storage, host)
            weakref.finalize(entry, _finish, self.target, self.pool, entry.d2h, host)
            group.events.append(entry.d2h)
            self.stats.offloaded += 1
            self.stats.offloaded_bytes += entry.nbytes
            self._note("d2h", group.index)
        group.state = "copying"
        self._copying.append(group)
        while len(self._copying) > self.config.max_in_flight:
            oldest = self._copying.popleft()
            self.stats.waits += 1
            for event in oldest.events:
                self.target.synchronize(event)
            self._land(oldest)

    def _poll(self) -> None:
        while self._copying and all(self.target.done(e) for e in self._copying[0].events):
            self._land(self._copying.popleft())

    def _land(self, group: _Group) -> None:
        for entry in group.live():
            entry.storage = None  # the host copy is complete: the device memory may go
        group.events = []
        group.state = "landed"

    def _prune(self) -> None:
        for index in [i for i, g in self._groups.items() if g.state in ("landed", "kept") and not g.live()]:
            del self._groups[index]

    # -- backward: fetch ahead, unpack ---------------------------------------------------------------
    def _begin_backward(self) -> None:
        self._in_backward = True
        while self._waiting:  # the last keep_last blocks: never copied
            group = self._waiting.popleft()
            group.state = "kept"
            for entry in group.live():
                entry.was_kept = True
                self.stats.kept += 1
                self.stats.kept_bytes += entry.nbytes
        self._poll()

    def _fetch(self, group: _Group) -> None:
        if group.fetched:
            return
        group.fetched = True
        self._note("fetch", group.index)
        for entry in group.live():
            if entry.storage is not None or entry.restored is not None or entry.host is None:
                continue
            if entry.restored_ref is not None and entry.restored_ref() is not None:
                continue
            entry.restored, entry.h2d = self.target.to_device(entry.host)
            entry.restored_ref = weakref.ref(entry.restored)
            self.stats.restored += 1
            self.stats.restored_bytes += entry.nbytes

    @torch.compiler.disable  # bookkeeping in Python: never traced into a compiled graph
    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if isinstance(packed, tuple):  # dry run
            return packed[0]
        entry = packed.entry
        if not self._in_backward:
            self._begin_backward()
        group = self._groups.get(entry.group)
        if group is not None and not group.started:
            group.started = True
            self._note("unpack", group.index)
            self._fetch(group)
            for k in range(1, self.config.prefetch + 1):
                ahead = self._groups.get(group.index - k)
                if ahead is not None:
                    self._fetch(ahead)
        storage = entry.storage
        if storage is None:
            storage = entry.restored
            if storage is None and entry.restored_ref is not None:
                storage = entry.restored_ref()
            if storage is None:  # unpacked again (retain_graph) after the restored copy was freed
                storage, entry.h2d = self.target.to_device(entry.host)  # type: ignore[arg-type]
                entry.restored_ref = weakref.ref(storage)
                self.stats.restored += 1
                self.stats.restored_bytes += entry.nbytes
            self.target.wait(entry.h2d)
        entry.unpacked += 1
        if entry.unpacked >= entry.handles:
            entry.restored = None  # autograd holds the tensor while it needs it
        out = torch.empty(0, dtype=packed.dtype, device=packed.device)
        return out.set_(storage, packed.offset, packed.size, packed.stride)

    # -- inspection -----------------------------------------------------------------------------------
    def pending(self) -> dict[str, int]:
        """Groups by state and entries alive: what the offloader still holds (tests, diagnostics)."""
        out: dict[str, int] = {}
        for g in self._groups.values():
            if g.live():
                out[g.state] = out.get(g.state, 0) + 1
        out["entries"] = sum(len(g.live()) for g in self._groups.values())
        return out
