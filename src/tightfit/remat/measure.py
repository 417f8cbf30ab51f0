"""Measure what each block costs under each in-block option, exactly, on the model's device.

For one representative call per group of identical blocks, and for each option (store, selective
checkpoint policies, full recompute), the block runs forward and backward in isolation on fresh copies of
the recorded arguments, under the ruler (``tightfit.memory.LiveTracker``):

  keep      live bytes the block leaves behind after its forward (what the backward needs, plus its
            output, which stays alive until the next block's backward in a chain);
  fwd_peak  highest live bytes during its forward, above the level before it;
  bwd_peak  highest live bytes during its backward (recompute included, the block's parameter
            gradients and input gradients included), above the level when its backward starts;
  fwd_time, bwd_time  median wall time of untracked runs (seconds; backward includes the recompute).

Every option's gradients (parameters and inputs) are compared bit for bit with the store option's under
the same RNG seed; an option that does not reproduce them (a block that modifies its input in place, for
instance) is marked ``exact=False`` and never chosen.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tightfit.memory import LiveTracker
from tightfit.memory.flops import FlopCounter
from tightfit.remat.blocks import Group, _leaves
from tightfit.remat.execute import OPTIONS, STORE, run_call


@dataclass
class OptionCost:
    """Measured costs of one block under one option (bytes and seconds)."""

    option: str
    keep: int
    fwd_peak: int
    bwd_peak: int
    fwd_time: float
    bwd_time: float
    exact: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fresh(args: Any, flags: list[bool], leaves: list[torch.Tensor]) -> Any:
    """Copies of the recorded arguments (new storage) with the recorded requires_grad flags. An argument
    that requires grad is a non-leaf (a clone of a leaf appended to ``leaves``), as in the real step, so
    blocks that work in place on their input run as they do there."""
    if isinstance(args, torch.Tensor):
        flag = flags.pop(0) if flags else False
        t = args.detach().clone()
        if flag and (t.is_floating_point() or t.is_complex()):
            leaves.append(t.requires_grad_(True))
            return t.clone()
        return t
    if isinstance(args, tuple):
        return tuple(_fresh(a, flags, leaves) for a in args)
    if isinstance(args, list):
        return [_fresh(a, flags, leaves) for a in args]
    if isinstance(args, dict):
        return {k: _fresh(v, flags, leaves) for k, v in args.items()}
    return args


def _differentiable(out: Any) -> list[torch.Tensor]:
    return [t for t in _leaves(out if not hasattr(out, "to_tuple") else out.to_tuple()) if t.requires_grad]


class _Run:
    """One forward + backward of a group's block under an option, with fresh inputs."""

    def __init__(self, group: Group, option: str, seed: int) -> None:
        self.group, self.option, self.seed = group, option, seed
        self.forward = group.module.forward
        flags = list(group.flags)
        self.leaves: list[torch.Tensor] = []
        self.args = _fresh(group.args, flags, self.leaves)
        self.kwargs = _fresh(group.kwargs, flags, self.leaves)
        self.params = [p for p in group.module.parameters() if p.requires_grad]

    def inputs(self) -> list[torch.Tensor]:
        """The leaves behind the arguments that require grad (they receive the input gradients)."""
        return self.leaves

    def grad_outputs(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        gen = torch.Generator(device=outs[0].device if outs else "cpu").manual_seed(self.seed + 1)
        return [torch.randn(o.shape, generator=gen, dtype=o.dtype, device=o.device) for o in outs]

    def fwd(self) -> Any:
        torch.manual_seed(self.seed)
        return run_call(self.group.module, self.forward, self.option, self.args, self.kwargs)


def _measure_memory(run: _Run) -> tuple[int, int, int, list[torch.Tensor | None]]:
    for p in run.params:
        p.grad = None
    with LiveTracker(track=[run.args, run.kwargs]) as t:
        t.phase = "forward"
        base = t.current
        t.peak = t.current
        out = run.fwd()
        outs = _differentiable(out)
        keep = t.current - base
        fwd_peak = t.peak - base
        grads = run.grad_outputs(outs)
        start = t.current
        t.peak = t.current
        t.phase = "backward"
        if outs:
            torch.autograd.backward(outs, grads)
        bwd_peak = t.peak - start
        del out, outs, grads
    result = [p.grad for p in run.params] + [x.grad for x in run.inputs()]
    for p in run.params:
        p.grad = None
    return keep, fwd_peak, bwd_peak, result


def _measure_time(run: _Run, reps: int) -> tuple[float, float]:
    fwd, bwd = [], []
    for _ in range(reps):
        for p in run.params:
            p.grad = None
        for x in run.inputs():
            x.grad = None
        t0 = time.perf_counter()
        out = run.fwd()
        outs = _differentiable(out)
        t1 = time.perf_counter()
        if outs:
            torch.autograd.backward(outs, run.grad_outputs(outs))
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        del out, outs
    for p in run.params:
        p.grad = None
    return statistics.median(fwd), statistics.median(bwd)


class _OutputBytes(TorchDispatchMode):
    """A dispatch mode summing the bytes of every op output (memory traffic of pointwise work)."""

    total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        self.total += sum(t.nbytes for t in _leaves(out) if isinstance(t, torch.Tensor))
        return out


def step_cost(fn: Callable[[], Any], flop_rate: float, byte_rate: float) -> float:
    """Seconds of ``fn()`` by the --estimate cost model: FLOPs / flop_rate + bytes written / byte_rate."""
    with FlopCounter() as counter, _OutputBytes() as written:
        fn()
    return counter.total / flop_rate + written.total / byte_rate


def _count_time(run: _Run, flop_rate: float, byte_rate: float) -> tuple[float, float]:
    """(forward, backward) seconds by the --estimate cost model (see ``step_cost``)."""
    for p in run.params:
        p.grad = None
    box: list[Any] = []
    fwd = step_cost(lambda: box.append(run.fwd()), flop_rate, byte_rate)
    outs = _differentiable(box.pop())
    grads = run.grad_outputs(outs)
    bwd = step_cost(lambda: torch.autograd.backward(outs, grads) if outs else None, flop_rate, byte_rate)
    for p in run.params:
        p.grad = None
    return fwd, bwd


def _time_interleaved(group: Group, costs: dict[str, OptionCost], reps: int, seed: int) -> None:
    """Median forward/backward times of every runnable option, timed round-robin (one warm-up run each)
    so that load changes on a shared machine hit all options alike."""
    timed = [o for o, c in costs.items() if c.exact]
    runs = {o: _Run(group, o, seed) for o in timed}
    t0 = time.perf_counter()
    for o in timed:
        _measure_time(runs[o], 1)  # warm-up
    once = (time.perf_counter() - t0) / max(1, len(timed))
    n = reps if once < 0.05 else max(1, min(reps, 2))
    samples: dict[str, list[tuple[float, float]]] = {o: [] for o in timed}
    for _ in range(n):
        for o in timed:
            samples[o].append(_measure_time(runs[o], 1))
    for o in timed:
        costs[o].fwd_time = statistics.median(f for f, _ in samples[o])
        costs[o].bwd_time = statistics.median(b for _, b in samples[o])


def _same(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a, b)
    )


def measure_group(
    group: Group,
    options: Sequence[str] = OPTIONS,
    *,
    reps: int = 3,
    seed: int = 1234,
    on_option: Callable[[str], None] | None = None,
    flop_rate: float | None = None,
    byte_rate: float | None = None,
) -> dict[str, OptionCost]:
    """Costs of ``group``'s block under each option (see the module docstring).

    With ``flop_rate`` (FLOP/s) and ``byte_rate`` (bytes written per second; default flop_rate / 50),
    times come from counts instead of clocks, and gradients are not compared (under FakeTensorMode there
    are no values): the ``--estimate`` cost model.
    """
    options = [STORE, *[o for o in options if o != STORE]]
    costs: dict[str, OptionCost] = {}
    reference: list[torch.Tensor | None] | None = None
    for option in options:
        run = _Run(group, option, seed)
        try:
            keep, fwd_peak, bwd_peak, grads = _measure_memory(run)
        except Exception as err:  # an option this block cannot run under (in-place input updates, ...)
            if option == STORE:
                raise RuntimeError(f"block {group.path} fails when run on its own: {err}") from err
            costs[option] = OptionCost(option, 0, 0, 0, 0.0, 0.0, exact=False)
            continue
        if reference is None or flop_rate is not None:
            reference = grads if reference is None else reference
            exact = True
        else:
            exact = _same(reference, grads)
        del grads
        if flop_rate is not None:
            rate = byte_rate if byte_rate is not None else flop_rate / 50
            fwd_time, bwd_time = _count_time(_Run(group, option, seed), flop_rate, rate)
        else:
            fwd_time = bwd_time = 0.0  # timed below, all options interleaved
        costs[option] = OptionCost(option, keep, fwd_peak, bwd_peak, fwd_time, bwd_time, exact)
        if on_option is not None:
            on_option(option)
    if flop_rate is None:
        _time_interleaved(group, costs, reps, seed)
    return costs
