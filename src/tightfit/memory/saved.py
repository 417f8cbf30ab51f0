"""Exact bytes a forward pass keeps for the backward pass, deduplicated by storage.

NOTE [ Counting saved tensors ]
  1. Every tensor autograd saves goes through the innermost ``saved_tensors_hooks``; ours records the
     tensor's storage (the whole base storage behind a view: that is what stays alive) and returns the
     tensor unchanged, so nothing about the run changes.
  2. Parameters, buffers and inputs passed in ``exclude`` are not activations and are not counted; nor
     is any ``nn.Parameter`` or view of one (FSDP2's gathered parameters are real parameters that exist
     only during the step, freed after each block's forward and gathered again for its backward).
  3. Inside a non-reentrant ``torch.utils.checkpoint`` region the checkpoint's own hook replaces ours,
     which is right: those tensors are dropped and recomputed. What the region really keeps is
       a. its inputs, which checkpoint saves *outside* its hook, so rule 1 sees them; and
       b. with a selective-checkpoint policy, the outputs it caches in a private dict. Rule 1 cannot see
          those, so on exit the counter finds the caching modes created during the region and counts
          the storages they hold, attributed to the module that created them (a dispatch mode notes
          the creating module of every op output; keys of live storages are unique, so the latest note
          for a live storage is the right one).
  4. Storages are attributed to the module whose forward created them (named as in ``named_modules()``,
     "" for the root, "<outside>" outside every module), so the per-module numbers sum to the total.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tightfit._tree import StorageKey, storage_key, tensors_of
from tightfit.memory.live import local_tensors
from tightfit.memory.modules import ModuleScope

try:  # private classes: if a future torch renames them, only rule 3b is lost (and tested for).
    from torch.utils.checkpoint import _CachedTorchDispatchMode, _CachingTorchDispatchMode

    _SAC_MODES: tuple[type, ...] = (_CachingTorchDispatchMode, _CachedTorchDispatchMode)
except ImportError:  # pragma: no cover - depends on the torch version
    _SAC_MODES = ()

OUTSIDE = "<outside>"


def _sac_caches() -> dict[int, Any]:
    """The selective-checkpoint caches alive now, by id (held by the modes that fill and read them)."""
    if not _SAC_MODES:
        return {}
    return {id(o.storage): o.storage for o in gc.get_objects() if type(o) in _SAC_MODES}


class _CreationRecorder(TorchDispatchMode):
    """Notes which module created each op output's storage (rules 3b and 4)."""

    def __init__(self, scope: ModuleScope) -> None:
        super().__init__()
        self.scope = scope
        self.creator: dict[StorageKey, str] = {}

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        module = self.scope.innermost()
        for t in tree_leaves(out):
            if (
                isinstance(t, torch.Tensor)
                and (key := storage_key(t)) is not None
                and key not in self.creator
            ):
                # first op to return this storage created it; views and in-place ops come later
                self.creator[key] = OUTSIDE if module is None else module
                weakref.finalize(t.untyped_storage(), self.creator.pop, key, None)
        return out


class SavedTensorCounter(torch.autograd.graph.saved_tensors_hooks):
    """``with SavedTensorCounter(exclude=[model, x]) as c: loss = model(x)``; then ``c.bytes``.

    Count a forward pass only: selective-checkpoint caches are read when the context exits, and a
    backward inside the context would already have consumed them.

    ``c.per_module`` maps module path -> bytes (sums to ``c.bytes``); ``c.count`` is the number of
    distinct storages. The root for module names is the first module in `exclude`, or `root`.
    """

    def __init__(self, exclude: Any = (), *, root: torch.nn.Module | None = None) -> None:
        excluded = (storage_key(x) for t in tensors_of(exclude) for x in local_tensors(t))
        self._excluded = {k for k in excluded if k is not None}
        if root is None:
            root = next((m for m in tree_leaves(exclude) if isinstance(m, torch.nn.Module)), None)
            if root is None and isinstance(exclude, torch.nn.Module):
                root = exclude
        self._scope = ModuleScope(root)
        self._saved: dict[StorageKey, tuple[int, str]] = {}
        self._caches_before: set[int] = set()
        self._recorder = _CreationRecorder(self._scope)
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._record(t)
        return t

    def _record(self, t: torch.Tensor, module: str | None = None) -> None:
        if isinstance(t if t._base is None else t._base, torch.nn.Parameter):
            return  # a parameter or a view of one (addmm saves weight.t())
        key = storage_key(t)
        if key is None or key in self._excluded or key in self._saved:
            return
        if module is None:
            module = self._recorder.creator.get(key, self._scope.innermost())
        if module is None:
            module = OUTSIDE
        self._saved[key] = (t.untyped_storage().nbytes(), module)

    def __enter__(self) -> SavedTensorCounter:
        self._caches_before = set(_sac_caches())
        self._scope.__enter__()
        self._recorder.__enter__()
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._recorder.__exit__(*exc)
        self._scope.__exit__(*exc)
        for cache_id, cache in _sac_caches().items():
            if cache_id in self._caches_before:
                continue
            for entry in tree_leaves(dict(cache)):
                tensor = getattr(entry, "val", entry)  # SAC wraps cached outputs in _VersionWrapper
                if isinstance(tensor, torch.Tensor):
                    self._record(tensor)

    @property
    def bytes(self) -> int:
        """Total bytes of distinct storages kept for backward."""
        return sum(n for n, _ in self._saved.values())

    @property
    def count(self) -> int:
        return len(self._saved)

    @property
    def per_module(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for nbytes, module in self._saved.values():
            out[module] = out.get(module, 0) + nbytes
        return out
