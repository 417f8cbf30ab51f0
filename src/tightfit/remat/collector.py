"""Pause Python's cyclic garbage collector while checkpointed code runs.

NOTE [ The garbage collector during checkpointing ]
  Checkpoint's saved-tensor hooks make several Python objects per saved tensor (holders, weak
  references) that stay alive until the backward. The collector runs every ~700 allocations and fully
  every ten runs, and a full run walks every live object: hundreds of runs per forward over a growing
  heap. On a long RNN with small tensors collection can take half of a checkpointed forward's time
  (``benchmarks/remat/overhead.py`` measures it). So the collector is paused while a patched model runs
  a training forward (root hooks, resumed when the forward returns or raises; after a KeyboardInterrupt,
  at the model's next forward) and while a segment is recomputed in the backward. Reference counting
  frees everything as usual; only cyclic garbage made meanwhile waits for the next collection after it.
  Nothing is paused while torch.compile traces (a call into ``gc`` would break the graph).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import torch

_PAUSED = "_tightfit_gc_paused"  # on the root module: set while a forward of it has the collector paused


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """The collector off inside the block (as it was outside), unless it already was or we are tracing."""
    pause = not torch.compiler.is_compiling() and gc.isenabled()
    if pause:
        gc.disable()
    try:
        yield
    finally:
        if pause:
            gc.enable()


def pause_for_forward(root: torch.nn.Module, _args: Any) -> None:
    """Forward pre-hook on the root: pause the collector for a training forward. A pause still recorded
    here is from a forward that never returned (interrupted: forward hooks do not run on a
    KeyboardInterrupt): it is resumed first."""
    if torch.compiler.is_compiling():
        return
    if root.__dict__.pop(_PAUSED, False):
        gc.enable()
    if torch.is_grad_enabled() and root.training and gc.isenabled():
        gc.disable()
        root.__dict__[_PAUSED] = True


def resume_after_forward(root: torch.nn.Module, _args: Any, _output: Any) -> None:
    """Forward hook on the root (also called when the forward raises an Exception): resume the collector
    if the pre-hook paused it."""
    if not torch.compiler.is_compiling() and root.__dict__.pop(_PAUSED, False):
        gc.enable()
