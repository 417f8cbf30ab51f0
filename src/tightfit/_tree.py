"""Tensors inside nested Python values, and one definition of "the same storage".

The ruler, remat and sketch all ask which tensors a value holds and whether two tensors share memory;
they ask it here, so the answer is the same everywhere (two tensors are the same memory when they view
one storage: ``(storage._cdata, storage type)``, which, unlike ``data_ptr()``, does not collide for
zero-size storages and is defined under fake tensors).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

StorageKey = tuple[int, int]


def leaves(x: Any) -> list[torch.Tensor]:
    """The tensors in ``x``: a tensor, or tuples, lists and mappings of them (other values are skipped)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in leaves(v)]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in leaves(v)]
    return []


def storage_id(st: torch.UntypedStorage) -> StorageKey:
    """Identity of a storage (every view of it, and every Python wrapper of it, has the same)."""
    return (st._cdata, id(type(st)))


def tensors_of(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor ``obj`` holds: a module's parameters, buffers and gradients, an optimizer's state, and
    the tensors in (nested) mappings, lists, tuples and sets of these. The ruler counts these as the
    memory that exists before a step starts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
        yield from (p.grad for p in obj.parameters() if p.grad is not None)
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from tensors_of(state)
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from tensors_of(value)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from tensors_of(value)


def storage_key(t: torch.Tensor) -> StorageKey | None:
    """Identity of a tensor's storage, or None for tensors without one (sparse, some subclasses)."""
    if t.layout != torch.strided:
        return None
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return storage_id(st)


def same_tensors(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> bool:
    """Whether two lists of optional tensors are equal element by element, bit for bit (``torch.equal``)."""
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a, b)
    )
