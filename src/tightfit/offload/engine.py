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
  4. backward: the first time a tensor that block i saved is unpacked, the backward of block i has
     started: group i is fetched (if not already) and groups i-1 ... i-prefetch start coming back on the
     side stream; an unpack makes the compute stream wait for its entry's copy event, never the host. A
     storage several blocks save (Hugging Face Llama's rotary position embeddings, passed to every layer)
     is one entry of the first group that saved it; the later groups fetch that entry alone (with
     themselves, or when one of their tensors on it is unpacked), never its owner's whole group;
  5. groups never copied when the backward starts (the last ``keep_last``) stay on the device;
  6. an entry belongs to the autograd graph (the packed handles hold it): when the graph is freed (after
     the backward, or when a failed forward's partial graph is dropped) its host buffer returns to the
     pool, after the copy into it has finished; the pool waits for the latest copy back out of it (a
     prefetch nobody waited on) before it unpins and frees the buffer.

NOTE [ Host pool ]: buffers are reused best fit, up to ``HostPool.slack`` (1.25) times the bytes asked
for, and released when they stayed free through a whole step, so the pool holds at most about two steps'
worth when shapes vary (sequence lengths) and exactly one step's when they repeat.

NOTE [ In-place writes ]: under saved_tensors_hooks autograd no longer checks saved tensors' versions, and
an offloaded copy would hide a later write. The engine records each saved tensor's version and a weak
reference to it; the unpack raises autograd's "modified by an inplace operation" error when the tensor is
alive and its version moved, and the copy out notes a write made before it (then the storage is not
copied and the unpack raises even if the tensor is gone). A write after the copy out to a tensor that is
gone by the backward cannot be seen.
Nothing is left hooked after a block's call, even one that raised: the hooks are pushed and popped
around each call.

NOTE [ What never moves ] (`Offloader.reason`): tensors not on the target's device; ``nn.Parameter``
objects and views of them (FSDP2's gathered parameters are real Parameters); storages of the parameters
and buffers the offloader was told to protect (read again at each step's start); parameter casts
(autocast's cached low-precision weights: the cache keeps them alive, so moving them frees nothing);
tensors with a lazy conjugate or negation bit (the restored tensor would lose it); storages under
``min_bytes``.

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

from tightfit._tree import StorageKey, storage_id, storage_key, tensors_of
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
    """Host buffers reused across steps: best fit among the free buffers, within a bounded slack.

    `take(nbytes)` returns the smallest free buffer of at least ``nbytes`` and at most ``nbytes * slack``
    bytes (the caller copies into its first ``nbytes``), else allocates one of exactly ``nbytes``. So the
    pool stays exact while the shapes repeat and reuses buffers when they vary a little (sequence lengths).
    `new_step()` (called at each step's start) releases the buffers that stayed free through the whole
    previous step, so shapes that stop coming back do not keep host memory forever.

    ``bytes`` is what the pool holds (free and in use), ``in_use`` what entries hold now, ``allocations``
    how many buffers were ever allocated. With ``max_bytes``, free buffers are released to make room
    before the pool refuses to grow.
    """

    def __init__(self, target: Target, max_bytes: int | None = None, slack: float = 1.25) -> None:
        if slack < 1:
            raise ValueError(f"HostPool slack must be >= 1, got {slack!r}")
        self.target = target
        self.max_bytes = max_bytes
        self.slack = slack
        # (buffer, step it was last taken or given back, copies out of it that may still run)
        self._free: list[tuple[torch.Tensor, int, list[Any]]] = []
        self._step = 0
        self.bytes = 0
        self.in_use = 0
        self.allocations = 0

    def take(self, nbytes: int, what: str = "") -> torch.Tensor:
        """A host buffer of at least `nbytes` bytes (at most ``slack`` times more); copy into its start."""
        best = None
        for i, (buf, _, _) in enumerate(self._free):
            size = buf.numel()
            if nbytes <= size <= nbytes * self.slack and (best is None or size < self._free[best][0].numel()):
                best = i
                if size == nbytes:
                    break
        if best is not None:
            buf = self._free.pop(best)[0]  # copies still reading it run before the next copy into it
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
        self.in_use += buf.numel()
        return buf

    def give_back(self, buf: torch.Tensor, pending: list[Any] | None = None) -> None:
        """Return a buffer; `pending`: events of copies that may still read it (waited on before it is
        freed; a later copy into it is queued behind them on the same side stream)."""
        self.in_use -= buf.numel()
        self._free.append((buf, self._step, list(pending or ())))

    def new_step(self) -> None:
        """A step starts: release the buffers that were free through the whole previous step."""
        stale = [item for item in self._free if item[1] < self._step]
        self._free = [item for item in self._free if item[1] >= self._step]
        for item in stale:
            self._free_one(item)
        self._step += 1

    def _free_one(self, item: tuple[torch.Tensor, int, list[Any]]) -> None:
        buf, _, pending = item
        for event in pending:
            self.target.synchronize(event)
        self.bytes -= buf.numel()
        self.target.free_host(buf)

    def _release_free(self, need: int) -> None:
        self._free.sort(key=lambda item: item[0].numel())
        while self._free and need > 0:
            item = self._free.pop()  # largest first: fewest buffers released
            need -= item[0].numel()
            self._free_one(item)

    def free_buffers(self) -> list[torch.Tensor]:
        """The buffers not in use (e.g. to count them as existing memory with a `LiveTracker`)."""
        return [item[0] for item in self._free]

    def release(self) -> None:
        """Free every buffer not in use (a later step allocates again)."""
        self._release_free(self.bytes)

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
                 "h2d", "handles", "unpacked", "events", "saved", "modified")

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
        # the copies using the host buffer: [the copy out, the latest copy back] (one side stream runs them
        # in order); shared with the finalizer: it waits for the copy out, the pool for the copy back
        # before it frees the buffer (NOTE [ Lifecycle of a group ] 6)
        self.events: list[Any] = []
        # the saved tensors on this storage, weakly (the packed handles own the entry, not the reverse)
        self.saved: list[weakref.ref[_Packed]] = []
        self.modified: str | None = None  # the error to raise at unpack: a saved tensor was written to


class _Packed:
    """What autograd holds instead of a saved tensor: the entry, the group (block call) that saved it, how
    the tensor views its storage, and its version counter at save time with a weak reference to it (under
    saved_tensors_hooks autograd no longer checks for in-place writes, so the engine does)."""

    __slots__ = ("__weakref__", "entry", "group", "dtype", "offset", "size", "stride", "device", "version",
                 "ref")

    def __init__(self, entry: _Entry, group: int, t: torch.Tensor) -> None:
        self.entry = entry
        self.group = group
        self.dtype = t.dtype
        self.offset = t.storage_offset()
        self.size = t.size()
        self.stride = t.stride()
        self.device = t.device
        self.version = t._version
        self.ref = weakref.ref(t)

    def changed(self) -> str | None:
        """Autograd's error message when the saved tensor is alive and was modified in place, else None."""
        t = self.ref()
        if t is None or t._version == self.version:
            return None
        return _inplace_message(t, t._version, self.version)


class _Kept:
    """A saved tensor that stays on the device, with its version at save time (autograd's check)."""

    __slots__ = ("tensor", "version")

    def __init__(self, t: torch.Tensor) -> None:
        self.tensor = t
        self.version = t._version


def _inplace_message(t: torch.Tensor, now: int, saved: int) -> str:
    return (
        "one of the variables needed for gradient computation has been modified by an inplace operation: "
        f"[{t.type()} {list(t.shape)}] is at version {now}; expected version {saved} instead. (Found by "
        "tightfit.offload, which checks saved tensors as autograd does.) Hint: clone the tensor before "
        "modifying it in place, or do not modify it before the backward"
    )


class _Group:
    __slots__ = ("index", "name", "entries", "foreign", "state", "fetched", "started", "events")

    def __init__(self, index: int, name: str) -> None:
        self.index = index
        self.name = name
        self.entries: list[weakref.ref[_Entry]] = []
        # entries of earlier groups this call saved again (a storage shared across blocks): fetched with
        # this group, copied and landed by their own
        self.foreign: list[weakref.ref[_Entry]] = []
        self.state = "open"  # open -> waiting -> copying -> landed | kept
        self.fetched = False  # its copies back to the device were issued
        self.started = False  # its backward has started (a tensor of it was unpacked)
        self.events: list[Any] = []

    def live(self) -> list[_Entry]:
        return [e for e in (r() for r in self.entries) if e is not None]

    def live_foreign(self) -> list[_Entry]:
        return [e for e in (r() for r in self.foreign) if e is not None]


def _finish(target: Target, pool: HostPool, events: list[Any], host: torch.Tensor) -> None:
    """An entry died: its host buffer goes back to the pool once the copy into it has finished; the latest
    copy back out of it (a prefetch nobody waited on) goes with it, and the pool waits for that one before
    it frees the buffer (reusing it is safe at once: the next copy into it runs after, on the same side
    stream), so the host never blocks on a copy back here."""
    if events:
        target.synchronize(events[0])
    pool.give_back(host, events[1:])


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
        # what `protect` was given, weakly (modules, tensors): re-read at each step's start, so parameters
        # and buffers replaced or added after the offloader was made are protected too
        self._protect_refs: list[weakref.ref[Any]] = []
        self._protect_stale = False
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
        """Never move the storages of these tensors (modules: their parameters, buffers and grads, read
        again at each step's start)."""
        sources = [objs] if isinstance(objs, torch.nn.Module) else list(tensors_of(objs))
        for obj in sources:
            self._protect_refs.append(weakref.ref(obj))
        self._protect_objects(sources)
        self._protect_stale = True  # read again when the next step starts

    def _protect_objects(self, objs: Any) -> None:
        for t in tensors_of(objs):
            key = storage_key(t)
            if key is not None:
                self._protected.add(key)

    def _reprotect(self) -> None:
        alive = [obj for obj in (r() for r in self._protect_refs) if obj is not None]
        self._protect_refs = [weakref.ref(obj) for obj in alive]
        self._protected = set()
        self._protect_objects(alive)
        self._protect_stale = False

    # -- pickling (torch.save of a converted model): a fresh offloader with the same settings -----------
    def __getstate__(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "target": self.target,
            "protect": [obj for obj in (r() for r in self._protect_refs) if obj is not None],
            "dry_run": self.dry_run,
            "trace": self.trace is not None,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"], state["target"],  # type: ignore[misc]
                      dry_run=state["dry_run"], trace=state["trace"])
        # the model may not be rebuilt yet (it holds this offloader): read its tensors at the first step
        self._protect_refs = [weakref.ref(obj) for obj in state["protect"]]
        self._protect_stale = True

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
        if t.is_conj() or t.is_neg():  # a lazy conjugate/negation bit that set_ would not bring back
            return "conj/neg view"
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
            self.pool.new_step()
            self._protect_stale = True
        if self._protect_stale:
            self._reprotect()
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
            return _Kept(t)
        storage = t.untyped_storage()
        key = storage_id(storage)  # reason() returned None: a plain storage
        ref = self._by_key.get(key)
        entry = ref() if ref is not None else None
        if entry is None or entry.group < self._step_start:
            entry = _Entry(group.index, storage)
            group.entries.append(weakref.ref(entry))
            self._by_key[key] = weakref.ref(entry)
            weakref.finalize(storage, self._by_key.pop, key, None)  # keys are unique only while alive
        elif entry.group != group.index and all(r() is not entry for r in group.foreign):
            group.foreign.append(weakref.ref(entry))
        entry.handles += 1
        if self.dry_run:
            # count the storage, keep the tensor: nothing moves
            return (_Kept(t), entry)
        packed = _Packed(entry, group.index, t)
        entry.saved.append(weakref.ref(packed))
        return packed

    def _copy_out(self, group: _Group) -> None:
        entries = group.live()
        for entry in entries:
            if entry.storage is None or entry.host is not None:
                continue
            if entry.modified is None:
                packs = [p for p in (r() for r in entry.saved) if p is not None]
                entry.modified = next((m for m in (p.changed() for p in packs) if m), None)
            if entry.modified is not None:  # written to in place: the unpack raises; copying is wasted
                continue
            buf = self.pool.take(entry.nbytes, f" (block {group.name!r})" if group.name else "")
            host = buf if buf.numel() == entry.nbytes else buf[: entry.nbytes]
            entry.host = host
            entry.d2h = self.target.to_host(entry.storage, host)
            entry.events.append(entry.d2h)
            weakref.finalize(entry, _finish, self.target, self.pool, entry.events, buf)
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
        for index in [i for i, g in self._groups.items()
                      if g.state in ("landed", "kept") and not g.live() and not g.live_foreign()]:
            del self._groups[index]

    # -- backward: fetch ahead, unpack ---------------------------------------------------------------
    def _begin_backward(self) -> None:
        self._in_backward = True
        while self._waiting:  # the last keep_last blocks: never copied
            group = self._waiting.popleft()
            group.state = "kept"
            for entry in group.live():
                self.stats.kept += 1
                self.stats.kept_bytes += entry.nbytes
        self._poll()

    def _fetch(self, group: _Group) -> None:
        if group.fetched:
            return
        group.fetched = True
        self._note("fetch", group.index)
        for entry in group.live() + group.live_foreign():
            self._fetch_entry(entry)

    def _fetch_entry(self, entry: _Entry) -> None:
        """Start copying one entry back, unless it is on the device or already coming back."""
        if entry.storage is not None or entry.restored is not None or entry.host is None:
            return
        if entry.restored_ref is not None and entry.restored_ref() is not None:
            return
        entry.restored = self._copy_back(entry)

    def _copy_back(self, entry: _Entry) -> torch.UntypedStorage:
        """Start copying an entry's host copy back to the device; return the new storage, which the entry
        references weakly only (a caller that needs it kept alive holds it)."""
        storage, entry.h2d = self.target.to_device(entry.host)  # type: ignore[arg-type]
        entry.restored_ref = weakref.ref(storage)
        # one side stream runs the copies in order: the latest copy back covers the earlier ones
        entry.events[1:] = [entry.h2d]
        self.stats.restored += 1
        self.stats.restored_bytes += entry.nbytes
        return storage

    @torch.compiler.disable  # bookkeeping in Python: never traced into a compiled graph
    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, tuple):  # dry run
            packed = packed[0]
        if isinstance(packed, _Kept):
            t = packed.tensor
            if t._version != packed.version:
                raise RuntimeError(_inplace_message(t, t._version, packed.version))
            return t
        entry = packed.entry
        message = packed.changed() or entry.modified
        if message is not None:
            raise RuntimeError(message)
        if not self._in_backward:
            self._begin_backward()
        # the group that saved this tensor drives the prefetch: a storage saved by several blocks (Llama's
        # rotary position embeddings) belongs to the first one, whose other entries are not needed yet
        group = self._groups.get(packed.group)
        if group is not None and not group.started:
            group.started = True
            self._note("unpack", group.index)
            self._fetch(group)
            for k in range(1, self.config.prefetch + 1):
                ahead = self._groups.get(group.index - k)
                if ahead is not None:
                    self._fetch(ahead)
        if entry.group != packed.group:
            self._fetch_entry(entry)  # only this storage of the other group
        storage = entry.storage
        if storage is None:
            storage = entry.restored
            if storage is None and entry.restored_ref is not None:
                storage = entry.restored_ref()
            if storage is None:  # unpacked again (retain_graph) after the restored copy was freed
                storage = self._copy_back(entry)
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
