"""Exact live-tensor memory on any device: a dispatch mode that sees every storage an op creates and a
finalizer on each storage that sees it die. No allocator statistics needed, so it works on CPU and under
FakeTensorMode (where nothing is allocated at all).

NOTE [ What the tracker counts ]
  1. A storage counts from the op that first returns it until its last view dies, at ``nbytes()``.
  2. Tensors that exist before the tracker starts count only if registered with ``track(...)``.
  3. The peak is sampled after each op, so buffers an op allocates and frees inside its own kernel are
     not seen (the allocator-level profiler sees them); allocator rounding and caching are not modelled.
  4. Tensors made outside the dispatcher (``torch.from_numpy``, Inductor's own buffers) are not seen,
     except the CPU RNG state ``checkpoint`` stashes per region (5 KiB): ``torch.get_rng_state`` is
     wrapped while the tracker is active to count it (a 1000-step LSTM plan has hundreds of regions).
  5. Observing changes the step a little: under any Python dispatch mode autograd accumulates some
     gradients out of place (an RNN's per-step gradients in checkpointed segments; measured by
     ``benchmarks/memory/ruler_vs_allocator.py``), so the peak counted is that of the observed step, an
     upper bound of the plain one. ``tightfit.memory.allocator_peak`` reads the plain step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tightfit._tree import StorageKey, storage_key, tensors_of
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


class LiveTracker(TorchDispatchMode):
    """Track live tensor bytes: ``with LiveTracker(track=[model, batch, opt]) as t: step()``; ``t.peak``.

    ``phase`` is a free-form label the caller sets ("forward", "backward", ...); the peak records it.
    With ``root=model`` the innermost running module of each op is known (``peak_module`` and per-module
    forward/backward peaks in ``module_peaks``). With ``timeline=True`` every op's live bytes are kept.
    """

    def __init__(
        self,
        track: Any = (),
        *,
        root: torch.nn.Module | None = None,
        timeline: bool = False,
    ) -> None:
        super().__init__()
        self._live: dict[StorageKey, int] = {}
        self.current = 0
        self.peak = 0
        self.peak_op: str | None = None
        self.peak_phase: str | None = None
        self.peak_module: str | None = None
        self.phase = "run"
        self.ops = 0
        self.timeline: list[TimelinePoint] | None = [] if timeline else None
        self.module_peaks: dict[str, ModulePeaks] = {}
        self.phase_peaks: dict[str, int] = {}
        self._scope = ModuleScope(root) if root is not None else None
        self._tracked_before = list(tensors_of(track)) if track is not None else []

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

    def _register(self, t: torch.Tensor) -> None:
        key = storage_key(t)
        if key is None:
            return
        st = t.untyped_storage()
        nbytes = st.nbytes()
        known = self._live.get(key)
        if known is None:
            self._live[key] = nbytes
            self.current += nbytes
            weakref.finalize(st, self._free, key)
        elif known != nbytes:  # resized in place (resize_, set_, out=)
            self._live[key] = nbytes
            self.current += nbytes - known

    def _free(self, key: StorageKey) -> None:
        nbytes = self._live.pop(key, None)
        if nbytes is not None:
            self.current -= nbytes

    # -- sampling -----------------------------------------------------------------------------------
    def _sample(self, op: str) -> None:
        self.ops += 1
        module = self._scope.innermost() if self._scope is not None else None
        if self.current > self.peak:
            self.peak = self.current
            self.peak_op = op
            self.peak_phase = self.phase
            self.peak_module = module
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
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._register(t)
        self._sample(str(func))
        return out

    def __enter__(self) -> LiveTracker:
        if self._scope is not None:
            self._scope.__enter__()
        super().__enter__()
        # checkpoint stashes the CPU RNG state (5 KiB) per region, made outside the dispatcher
        self._get_rng_state = get_rng_state = torch.get_rng_state

        def counted_get_rng_state() -> torch.Tensor:
            state = get_rng_state()
            self._register(state)
            return state

        torch.get_rng_state = counted_get_rng_state
        for t in self._tracked_before:
            self._register(t)
        self._tracked_before = []
        self.baseline = self.current
        self._sample("<start>")
        return self

    def __exit__(self, *exc: object) -> None:
        torch.get_rng_state = self._get_rng_state
        super().__exit__(*exc)
        if self._scope is not None:
            self._scope.__exit__(*exc)
