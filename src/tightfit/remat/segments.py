"""Checkpoint a run of consecutive block calls as ONE region, driven by the user's own forward code.

NOTE [ How a segment is checkpointed ]
  Checkpointing blocks i..j together (as ``checkpoint_sequential`` does) keeps only what enters the
  segment (an RNN's state at one time step, one transformer hidden state) instead of every block's
  input. The user's code drives the forward, so the region is opened when block i is called and closed
  when block j returns, with the generator behind ``torch.utils.checkpoint(use_reentrant=False)``: the
  same RNG/autocast stashing, saved-tensor placeholders, early stop and metadata check.
  What the recomputation reruns is recorded while the region runs: the block calls (module, arguments)
  and, between them, the torch calls of the glue code (a ``TorchFunctionMode`` that is active only between
  blocks: ``xs[:, t]``, a dropout on the state, ...). Tensors are recorded by identity: an argument an
  earlier recorded call produced is a reference (not held), any other one is an input of the segment
  (held, as checkpoint holds its arguments). The replay reruns the recorded calls in order on the same
  inputs from the same RNG state, so it saves the same tensors in the same order, data-dependent Python
  control flow included (what is replayed is what ran).
  Refused with ``SegmentError`` (raised in the forward, before any backward could use wrong tensors):
  a recorded call that mutates a segment input in place (the replay would apply it twice).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch._C import _pop_torch_function_stack, _push_on_torch_function_stack
from torch.overrides import TorchFunctionMode, _get_current_function_mode
from torch.utils import checkpoint as _ckpt

from tightfit.remat import collector
from tightfit.remat.options import InSegment, Segment


class SegmentError(RuntimeError):
    """A segment's forward did something its recomputation could not reproduce."""


class _Step:
    """One recorded call: ``run`` on the flattened arguments ``leaves``, where the positions named in
    ``refs`` (position, producing step, its output index) hold tensors an earlier call produced (None in
    ``leaves``: not held). Plain slots: recording makes one per call, on the forward's hot path."""

    __slots__ = ("run", "leaves", "refs", "spec")

    def __init__(
        self, run: Callable[..., Any], leaves: list[Any], refs: list[tuple[int, int, int]], spec: Any
    ) -> None:
        self.run = run
        self.leaves = leaves
        self.refs = refs
        self.spec = spec


_CONTAINERS = (tuple, list, dict)


def _flatten(args: tuple, kwargs: Mapping[str, Any]) -> tuple[list[Any], Any]:
    """(leaves, spec) of a call's arguments. Positional arguments that are leaves or tuples of leaves (an
    RNN cell's ``(x, (h, c))``, an indexing tuple) take a fast path; anything else goes through torch's
    pytree. Recording runs once per call in a segment, so this is on the hot path."""
    if not kwargs:
        leaves: list[Any] = []
        shape: list[int] = []
        for a in args:
            if type(a) is tuple:
                for x in a:
                    if isinstance(x, _CONTAINERS):
                        break
                else:
                    leaves.extend(a)
                    shape.append(len(a))
                    continue
                break
            if isinstance(a, _CONTAINERS):
                break
            leaves.append(a)
            shape.append(-1)
        else:
            return leaves, tuple(shape)
    return pytree.tree_flatten((tuple(args), dict(kwargs)))


def _unflatten(leaves: list[Any], spec: Any) -> tuple[tuple, dict]:
    if isinstance(spec, tuple):
        args, i = [], 0
        for n in spec:
            if n < 0:
                args.append(leaves[i])
                i += 1
            else:
                args.append(tuple(leaves[i : i + n]))
                i += n
        return tuple(args), {}
    return pytree.tree_unflatten(leaves, spec)


def _call_name(what: Any) -> str:
    """A recorded call's name in an error: the block's module class, or the torch function's name."""
    if isinstance(what, torch.nn.Module):
        return type(what).__name__
    return getattr(what, "__name__", str(what))


def _tensors(out: Any) -> list[Tensor]:
    """The tensors of a call's output, in a fixed order."""
    if isinstance(out, Tensor):
        return [out]
    if type(out) is tuple and all(isinstance(t, Tensor) for t in out):
        return list(out)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]


@functools.cache
def _generator_prefix() -> tuple[Any, ...]:
    """Default values of the positional parameters of checkpoint's generator between ``fn`` and ``*args``
    (their number differs between torch versions)."""
    params = list(inspect.signature(_ckpt._checkpoint_without_reentrant_generator).parameters.values())
    prefix = []
    for p in params[1:]:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            break
        prefix.append(p.default)
    return tuple(prefix)


class _GlueRecorder(TorchFunctionMode):
    """Records the torch calls the user's code makes between the blocks of an open region."""

    def __init__(self, region: Region) -> None:
        super().__init__()
        self.region = region

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        return self.region.record(func, args, kwargs or {}, func)


class Region:
    """One open segment: records what runs in it and is recomputed as a whole in the backward."""

    def __init__(self, blocks: int, first_args: tuple, first_kwargs: Mapping[str, Any]) -> None:
        self.left = blocks
        self.steps: list[_Step] = []
        self.produced: dict[int, tuple[weakref.ref, int, int]] = {}  # id(tensor) -> (ref, step, index)
        self.release: dict[int, list[int]] = {}
        self.mode = _GlueRecorder(self)
        self.recording = False
        inputs = [t for t in pytree.tree_leaves((first_args, dict(first_kwargs))) if isinstance(t, Tensor)]
        self.gen = _ckpt._checkpoint_without_reentrant_generator(self.replay, *_generator_prefix(), *inputs)
        next(self.gen)

    # -- forward ------------------------------------------------------------------------------------
    def record(self, run: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any], what: Any) -> Any:
        """Run ``run(*args, **kwargs)`` and record it for the replay (calls returning no tensor are not
        recorded: they save nothing and produce nothing a later call could read). ``what`` (the block's
        module or the torch function) only names the call in an error."""
        leaves, spec = _flatten(args, kwargs)
        produced_by = self.produced
        refs: list[tuple[int, int, int]] = []
        inputs: list[tuple[Tensor, int]] = []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor):
                hit = produced_by.get(id(leaf))
                if hit is not None and hit[0]() is leaf:
                    refs.append((i, hit[1], hit[2]))
                    leaves[i] = None
                else:
                    inputs.append((leaf, leaf._version))
        out = run(*args, **kwargs)
        for t, version in inputs:
            if t._version != version:
                raise SegmentError(
                    f"{_call_name(what)} changed a tensor in place that entered a checkpointed segment from "
                    "outside; recomputing the segment would apply that change twice. Plan without segments "
                    "(rematerialize(..., segments=False)) or make the change out of place."
                )
        produced = _tensors(out)
        if produced:
            k = len(self.steps)
            for j, t in enumerate(produced):
                produced_by[id(t)] = (weakref.ref(t), k, j)
            self.steps.append(_Step(run, leaves, refs, spec))
        return out

    def block(
        self, module: torch.nn.Module, forward: Callable[..., Any], args: tuple, kwargs: Mapping
    ) -> Any:
        """Run one block call of the region (outside the glue recorder). ``forward`` is called again by
        the replay (so it must leave running statistics alone when recomputing)."""
        self.pause()
        out = self.record(forward, args, kwargs, module)
        self.left -= 1
        if self.left > 0:
            self.resume()
        return out

    def resume(self) -> None:
        _push_on_torch_function_stack(self.mode)  # what entering the mode does, without two Python calls
        self.recording = True

    def pause(self) -> None:
        if not self.recording:
            return
        if _get_current_function_mode() is not self.mode:
            raise SegmentError(
                "a torch function mode entered inside a checkpointed segment was not exited before the next "
                "block: segments cannot span it (plan without segments)"
            )
        _pop_torch_function_stack()
        self.recording = False

    @property
    def done(self) -> bool:
        return self.left <= 0

    def close(self) -> None:
        """End the region normally (its last block returned, or the model's forward did)."""
        self.pause()
        last: dict[int, int] = {}
        for s, step in enumerate(self.steps):
            for _, k, _ in step.refs:
                last[k] = s
        for k, s in last.items():
            self.release.setdefault(s, []).append(k)
        self.produced.clear()
        self._end(lambda gen: next(gen, None))

    def abort(self) -> None:
        """End the region after an exception in its forward (pops checkpoint's hooks)."""
        with contextlib.suppress(SegmentError):
            self.pause()
        self._end(lambda gen: gen.close())

    def _end(self, finish: Callable[[Any], Any]) -> None:
        """Run checkpoint's generator to its end with ``finish(gen)``, then let reference counting free the
        region (and the segment inputs it holds) as soon as the autograd graph is freed: break the
        region <-> recorder cycle and clear the finished generator's frame, which a traceback made inside it
        (torch looks up device modules with ``getattr``) can keep alive with every local it had. On Python
        >= 3.12 a finished generator's frame also links back (``f_back``) to the frame that resumed it, so no
        local here may still reference it when this returns: that cycle held every region of a step, with
        its inputs, until the next garbage collection."""
        frame = self.gen.gi_frame
        try:
            finish(self.gen)
        finally:
            self.mode = None  # type: ignore[assignment]
            self.gen = None  # type: ignore[assignment]
            if frame is not None:
                frame.clear()
            del frame

    # -- backward -----------------------------------------------------------------------------------
    def replay(self, *_inputs: Any) -> None:
        """Rerun the recorded calls in order (checkpoint calls this under its recompute hooks), with the
        garbage collector paused (``tightfit.remat.collector``)."""
        values: dict[int, list[Tensor]] = {}
        with collector.paused():
            for k, step in enumerate(self.steps):
                leaves = step.leaves
                if step.refs:
                    leaves = list(leaves)
                    for i, s, j in step.refs:
                        leaves[i] = values[s][j]
                args, kwargs = _unflatten(leaves, step.spec)
                out = step.run(*args, **kwargs)
                values[k] = _tensors(out)
                for j in self.release.get(k, ()):
                    values.pop(j, None)


class Segments:
    """The region open in the current forward of one patched model (at most one at a time)."""

    def __init__(self) -> None:
        self.active: Region | None = None
        self.running = 0  # member calls in progress (a patched module nested in a member runs inside one)

    def call(
        self,
        module: torch.nn.Module,
        forward: Callable[..., Any],
        option: Segment | InSegment,
        args: tuple,
        kwargs: Mapping[str, Any],
    ) -> Any:
        """Run a block call whose option is a segment one (not under torch.compile, which cannot trace a
        region spanning calls)."""
        if not (torch.is_grad_enabled() and module.training):
            return forward(*args, **kwargs)
        if isinstance(option, Segment):
            self.finish()
            self.active = Region(option.length, args, kwargs)
        region = self.active
        if region is None:  # a member call with no open region (calls differ from the plan): plain
            return forward(*args, **kwargs)
        self.running += 1
        try:
            out = region.block(module, forward, args, kwargs)
        except BaseException:
            self.active = None
            region.abort()
            raise
        finally:
            self.running -= 1
        if region.done:
            self.active = None
            region.close()
        return out

    def finish(self, failed: bool = False) -> None:
        """Close a region still open (the forward ran fewer block calls than planned, or raised)."""
        region, self.active = self.active, None
        if region is not None:
            region.abort() if failed else region.close()
