"""What each block call and each piece of glue code reads of tensors made earlier in the forward.

A segment (``tightfit.remat.segments``) holds every tensor it reads from before its start until its
backward, whether a block or the glue code between its blocks reads it: an LSTM's ``torch.stack`` of the
per-step outputs before the head, inside a segment ending at the head, holds the outputs of every step
before the segment (a gigabyte on a GPU-sized LSTM) that would otherwise be freed once stacked. The chain
model counts such tensors in the segment's entry (``ChainCosts.reads``); this module records them.

NOTE [ Event times ]
  One forward is recorded with hooks on the planned block calls and a ``TorchFunctionMode`` that sees the
  torch calls made outside them (the glue). Events are numbered on one axis: block k is at time 2k + 1,
  the glue between blocks g - 1 and g at time 2g (glue after the last of L blocks at 2L). A tensor is made
  at the time of the call that returned it (a view of an argument, or an argument changed in place, keeps
  its storage's maker);
  parameters and the batch are not made in the forward and are left out: they live through the step
  whatever the plan. Tensors are identified by storage; a storage freed and reused later is a new tensor
  from the call that returned it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from tightfit._step import call_model
from tightfit._tree import StorageKey
from tightfit.remat.blocks import Block, storage_bytes
from tightfit.remat.solvers.chain_costs import Read


class _Recorder:
    """The makers and readers of storages, by event time."""

    def __init__(self, events: int) -> None:
        self.maker: dict[StorageKey, int] = {}  # storage -> tensor identity made last with it
        self.made: list[int] = []  # tensor identity -> event time of its maker
        self.nbytes: list[int] = []
        self.last: list[int] = []  # tensor identity -> event time of its last read
        self.reads: list[dict[int, None]] = [{} for _ in range(events)]  # event time -> tensors read

    def read(self, time: int, tensors: Any) -> set[StorageKey]:
        keys = set(storage_bytes(tensors))
        for key in keys:
            tensor = self.maker.get(key)
            if tensor is not None:
                self.reads[time][tensor] = None
                self.last[tensor] = time
        return keys

    def make(self, time: int, tensors: Any, inputs: set[StorageKey]) -> None:
        for key, nbytes in storage_bytes(tensors).items():
            if key in inputs:
                continue
            self.maker[key] = len(self.made)
            self.made.append(time)
            self.nbytes.append(nbytes)
            self.last.append(time)


class _Glue(TorchFunctionMode):
    """Records the torch calls made while no block call runs."""

    def __init__(self, recorder: _Recorder, clock: list[int]) -> None:
        super().__init__()
        self.recorder, self.clock = recorder, clock  # clock: [event time, 1 while a block call runs]

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        time, in_block = self.clock
        if not in_block:
            self.recorder.make(time, out, self.recorder.read(time, (args, kwargs)))
        return out


def record_reads(model: torch.nn.Module, batch: Any, blocks: Sequence[Block]) -> list[list[Read]]:
    """Per event time 0..2L (NOTE [ Event times ]): the tensors made earlier in the forward that the event
    reads. One forward of ``model`` on ``batch`` without autograd (the calls are the same, the memory is
    not kept); ``blocks`` are the planned block calls, in order."""
    position = {(b.path, b.call): k for k, b in enumerate(blocks)}
    paths = {id(m): p for p, m in model.named_modules()}
    block_paths = {b.path for b in blocks}
    planned = {id(m): m for p, m in model.named_modules() if p in block_paths}
    recorder = _Recorder(2 * len(blocks) + 1)
    clock = [0, 0]
    counts: dict[int, int] = {}
    # per open call of a planned module: (block, its reads)
    opened: list[tuple[int, set[StorageKey]] | None] = []

    def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        index = counts.get(id(module), 0)
        counts[id(module)] = index + 1
        k = position.get((paths[id(module)], index)) if clock[1] == 0 else None
        if k is None:  # a call inside a block, or an unplanned call of a planned module (glue)
            opened.append(None)
            return
        clock[0], clock[1] = 2 * k + 1, 1
        opened.append((k, recorder.read(clock[0], (args, kwargs))))

    def post(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = opened.pop()
        if call is not None:
            k, keys = call
            recorder.make(2 * k + 1, output, keys)
            clock[0], clock[1] = 2 * k + 2, 0  # glue before block k + 1

    handles = []
    for module in planned.values():
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))
    try:
        with torch.no_grad(), _Glue(recorder, clock):
            call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    last = recorder.last
    return [
        [Read(recorder.made[t], t, recorder.nbytes[t], last[t]) for t in recorder.reads[time]]
        for time in range(len(recorder.reads))
    ]
