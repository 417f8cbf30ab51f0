"""Restore the random number generators a piece of code may move: the CPU's and every accelerator's.

Planning, probing and diagnostics run training steps (dropout draws random numbers, and
``torch.manual_seed`` reseeds the CPU and every CUDA device), yet they promise to leave every device's RNG
as they found it. ``forked_rng`` forks, with ``torch.random.fork_rng``, the CPU generator, the generators
of the devices the given tensors live on, and those of every CUDA device already initialised in the
process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch._subclasses.fake_tensor import is_fake


def rng_devices(tensors: Iterable[torch.Tensor]) -> dict[str, list[int]]:
    """Accelerator device type -> indices of the devices whose generators code on ``tensors`` can move
    (fake tensors do not count; every initialised CUDA device does)."""
    out: dict[str, set[int]] = {}
    for t in tensors:
        if t.device.type not in ("cpu", "meta") and not is_fake(t):
            out.setdefault(t.device.type, set()).add(t.device.index or 0)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out.setdefault("cuda", set()).update(range(torch.cuda.device_count()))
    return {kind: sorted(indices) for kind, indices in out.items()}


@contextlib.contextmanager
def forked_rng(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """On exit, restore the CPU generator and those of ``rng_devices(tensors)``."""
    with contextlib.ExitStack() as stack:
        devices = rng_devices(tensors)
        if not devices:
            stack.enter_context(torch.random.fork_rng(devices=[]))
        for kind, indices in devices.items():
            stack.enter_context(torch.random.fork_rng(devices=indices, device_type=kind))
        yield
