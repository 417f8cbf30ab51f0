"""Measure what each block costs under each in-block option, exactly, on the model's device.

For one representative call per group of identical blocks, and for each option (store, selective
checkpoint policies, full recompute), the block runs forward and backward in isolation on fresh copies of
the recorded arguments, under the ruler (``tightfit.memory.LiveTracker``):

  keep      live bytes the block leaves behind after its forward (what the backward needs, plus its
            output, which stays alive until the next block's backward in a chain);
  fwd_peak  highest live bytes during its forward, above the level before it;
  bwd_peak  highest live bytes during its backward (recompute included, the block's parameter
            gradients and input gradients included), above the level when its backward starts;
  fwd_time, bwd_time  median wall time of untracked runs (seconds; backward includes the recompute, and
            is raised where needed so that an option costs at least the recorded forward time of the
            ops it recomputes: ``_at_least_the_recomputed_ops``).

Every option's gradients (parameters and inputs) are compared bit for bit with the store option's under
the same RNG seed; an option that does not reproduce them (a block that modifies its input in place, for
instance) is marked ``exact=False`` and never chosen.

NOTE [ Op-level options ]
  Besides the named options, ``op_options`` captures the block's op sequence as the selective-checkpoint
  policy sees it (one recording forward): each op's output storages, bytes and time (the clock between
  consecutive policy calls). Ops whose outputs share storage (views, in-place updates such as dropout's
  ``bernoulli_`` then ``div_``) form one unit, kept or recomputed together, and all random ops of the
  block form one unit (a recomputed random op must see the RNG state it saw first, so the random ops
  recomputed cannot follow ones that are skipped). Units are ranked by recompute time saved per byte
  kept, and the shortest prefixes saving 30/55/80% of the recompute time become ``keep-ops`` options,
  measured like the others. Selective options that keep the same op positions as an earlier one (in a
  CNN, save-linear keeps what save-matmul keeps: its convolutions) run the same code and are measured
  once (``kept_positions``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint

from tightfit._step import wait_for_device
from tightfit._tree import leaves, same_tensors, storage_id
from tightfit.memory import LiveTracker
from tightfit.memory.flops import FlopCounter
from tightfit.remat.blocks import Group, autocast_as
from tightfit.remat.execute import (
    SAC_SAVED_OPS,
    keep_ops_option,
    keeps_output,
    norm_layers,
    run_call,
    sac_contexts,
    strict_op_sequences,
)
from tightfit.remat.options import DEFAULT_OPTIONS, STORE, KeepOps, Option, Recompute, SavePolicy, Store
from tightfit.remat.solvers.chain_costs import OptionCost


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
    return [t for t in leaves(out if not hasattr(out, "to_tuple") else out.to_tuple()) if t.requires_grad]


class _Run:
    """One forward + backward of a group's block under an option, with fresh inputs."""

    def __init__(self, group: Group, option: Option, seed: int) -> None:
        self.group, self.option, self.seed = group, option, seed
        self.forward = group.module.forward
        flags = list(group.flags)
        self.leaves: list[torch.Tensor] = []
        self.args = _fresh(group.args, flags, self.leaves)
        self.kwargs = _fresh(group.kwargs, flags, self.leaves)
        self.params = [p for p in group.module.parameters() if p.requires_grad]
        self.norms = norm_layers(group.module)

    def inputs(self) -> list[torch.Tensor]:
        """The leaves behind the arguments that require grad (they receive the input gradients)."""
        return self.leaves

    def grad_outputs(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        gen = torch.Generator(device=outs[0].device if outs else "cpu").manual_seed(self.seed + 1)
        return [torch.randn(o.shape, generator=gen, dtype=o.dtype, device=o.device) for o in outs]

    def fwd(self) -> Any:
        torch.manual_seed(self.seed)
        # the autocast state the block ran under in the step; a call off the measured ops raises
        with autocast_as(self.group.autocast), strict_op_sequences():
            return run_call(self.group.module, self.forward, self.option, self.args, self.kwargs, self.norms)


def accelerator_key(tensors: Any) -> str | None:
    """The ruler's key (``"cuda:0"``) of the first accelerator tensor among ``tensors``, None when all are
    on the CPU: on an accelerator, memory is measured on that device alone (what offload moves to the
    host leaves the device's budget)."""
    for t in leaves(tensors):
        if isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta"):
            return f"{t.device.type}:{t.device.index or 0}"
    return None


class _Level:
    """Live bytes and peak of a tracker, in total (CPU) or on one accelerator."""

    def __init__(self, t: LiveTracker, device: str | None) -> None:
        self.t, self.device = t, device

    @property
    def current(self) -> int:
        if self.device is None or self.device not in self.t.current_by_device:
            return self.t.current
        return self.t.current_by_device[self.device]

    @property
    def peak(self) -> int:
        if self.device is None or self.device not in self.t.peak_by_device:
            return self.t.peak
        return self.t.peak_by_device[self.device]

    def reset_peak(self) -> None:
        self.t.peak = self.t.current
        if self.device is not None:
            self.t.peak_by_device[self.device] = self.current


def _measure_memory(run: _Run) -> tuple[int, int, int, list[torch.Tensor | None]]:
    for p in run.params:
        p.grad = None
    device = accelerator_key([list(run.group.module.parameters()), run.args, run.kwargs])
    # the block's parameters and buffers exist before it runs: tracked from the start, so that a view of
    # a weight (nn.Linear's ``weight.t()``) is not counted as a new tensor the block keeps
    with LiveTracker(track=[run.args, run.kwargs, run.group.module]) as t:
        level = _Level(t, device)
        t.phase = "forward"
        base = level.current
        level.reset_peak()
        out = run.fwd()
        outs = _differentiable(out)
        keep = level.current - base
        fwd_peak = level.peak - base
        grads = run.grad_outputs(outs)
        start = level.current
        level.reset_peak()
        t.phase = "backward"
        if outs:
            torch.autograd.backward(outs, grads)
        bwd_peak = level.peak - start
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
        wait_for_device()
        t0 = time.perf_counter()
        out = run.fwd()
        outs = _differentiable(out)
        wait_for_device()
        t1 = time.perf_counter()
        if outs:
            torch.autograd.backward(outs, run.grad_outputs(outs))
        wait_for_device()
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
        self.total += sum(t.nbytes for t in leaves(out) if isinstance(t, torch.Tensor))
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


def _time_interleaved(group: Group, costs: dict[Option, OptionCost], reps: int, seed: int) -> None:
    """Median forward/backward times of every runnable option, timed round-robin so that load changes on
    a shared machine hit all options alike (the memory runs just before were the warm-up). Blocks slower
    than 50 ms get at most two rounds, slower than 0.5 s one (for large blocks measuring is most of the
    planning time, and their relative noise is small)."""
    timed = [o for o, c in costs.items() if c.exact]
    runs = {o: _Run(group, o, seed) for o in timed}
    samples: dict[Option, list[tuple[float, float]]] = {o: [_measure_time(runs[o], 1)] for o in timed}
    once = statistics.median(sum(samples[o][0]) for o in timed) if timed else 0.0
    rounds = reps if once < 0.05 else min(reps, 2) if once < 0.5 else 1
    for _ in range(rounds - 1):
        for o in timed:
            samples[o].append(_measure_time(runs[o], 1))
    for o in timed:
        costs[o].fwd_time = statistics.median(f for f, _ in samples[o])
        costs[o].bwd_time = statistics.median(b for _, b in samples[o])


@dataclass
class OpUnit:
    """Ops of one block call whose outputs share storage: kept or recomputed together."""

    ops: list[int] = field(default_factory=list)  # positions in the policy's op sequence
    bytes: int = 0  # storage bytes of their outputs (created inside the block)
    seconds: float = 0.0  # their forward time
    random: bool = False
    external: bool = False  # an output aliases a tensor made outside the block (never kept)


def _storages(out: Any) -> list[torch.UntypedStorage]:
    return [t.untyped_storage() for t in leaves(out) if isinstance(t, torch.Tensor) and t.numel()]


_OpRecord = tuple[Any, float, list[torch.UntypedStorage], list[tuple[int, int]]]  # op, s, outputs, input ids


def _record_ops(group: Group, seed: int) -> list[_OpRecord] | None:
    """One checkpointed forward of the block, recording every op the selective-checkpoint policy sees;
    None when this torch does not show op outputs to policies. The records reference the output
    storages, so no address is reused while recording."""
    run = _Run(group, STORE, seed)
    ops: list[_OpRecord] = []
    last = [0.0]
    supported = [True]

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if getattr(ctx, "is_recompute", False):
            return CheckpointPolicy.PREFER_RECOMPUTE
        wait_for_device()
        now = time.perf_counter()
        if not hasattr(ctx, "op_output"):
            supported[0] = False
            return CheckpointPolicy.PREFER_RECOMPUTE
        inputs = [storage_id(st) for st in _storages((args, kwargs))]
        ops.append((op, now - last[0], _storages(ctx.op_output), inputs))
        last[0] = time.perf_counter()
        return CheckpointPolicy.PREFER_RECOMPUTE

    def body(*a: Any, **k: Any) -> Any:
        wait_for_device()
        last[0] = time.perf_counter()
        return run.forward(*a, **k)

    torch.manual_seed(seed)
    with autocast_as(group.autocast):
        checkpoint(
            body, *run.args, use_reentrant=False, context_fn=lambda: sac_contexts(policy), **run.kwargs
        )
    return ops if supported[0] else None


def _units(ops: list[_OpRecord]) -> list[OpUnit]:
    """Group ops by output storage (union-find over storages an op outputs together); no times yet."""
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def find(k: tuple[int, int]) -> tuple[int, int]:
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k

    fresh: dict[tuple[int, int], int] = {}  # storage -> bytes, for storages first seen as a new op output
    # first seen as an output that aliases an input (block input, parameter)
    external: set[tuple[int, int]] = set()
    for _op, _dt, outs, inputs in ops:
        keys = [storage_id(st) for st in outs]
        for st, k in zip(outs, keys):
            if k not in parent:
                if k in inputs:
                    external.add(k)
                else:
                    fresh[k] = st.nbytes()
            find(k)
        for k in keys[1:]:
            parent[find(k)] = find(keys[0])
    units: dict[tuple[int, int], OpUnit] = {}
    for i, (op, _dt, outs, _inputs) in enumerate(ops):
        if outs:
            unit = units.setdefault(find(storage_id(outs[0])), OpUnit())
            unit.ops.append(i)
            unit.random = unit.random or torch.Tag.nondeterministic_seeded in getattr(op, "tags", ())
    for k in set(fresh) | external:
        unit = units[find(k)]
        unit.bytes += fresh.get(k, 0)
        unit.external = unit.external or k in external
    return list(units.values())


@dataclass
class OpProfile:
    """The op sequence of a block call (as selective-checkpoint policies see it) and its keepable units."""

    ops: list[Any]
    units: list[OpUnit]
    seconds: list[float] = field(default_factory=list)  # forward time of each op


def record_units(group: Group, seed: int = 1234, runs: int = 2) -> OpProfile:
    """The keepable op units of ``group``'s block (NOTE [ Op-level options ]), op times the minimum over
    ``runs`` recordings; no units when op outputs are not visible to policies or the sequence changes."""
    records = [_record_ops(group, seed) for _ in range(runs)]
    first = records[0]
    if first is None or any(r is None or [o for o, *_ in r] != [o for o, *_ in first] for r in records):
        return OpProfile([], [])
    seconds = [min(col) for col in zip(*[[dt for _, dt, _, _ in r] for r in records if r is not None])]
    ops = [op for op, *_ in first]
    units = _units(first)
    del records, first
    for u in units:
        u.seconds = sum(seconds[i] for i in u.ops)
    keep = [u for u in units if not u.external]
    if any(u.random and u.external for u in units):
        return OpProfile(ops, [u for u in keep if not u.random], seconds)  # a random op is never kept
    randoms = [u for u in keep if u.random]
    if len(randoms) > 1:
        merged = OpUnit(
            sorted(i for u in randoms for i in u.ops),
            sum(u.bytes for u in randoms),
            sum(u.seconds for u in randoms),
            random=True,
        )
        keep = [u for u in keep if not u.random] + [merged]
    return OpProfile(ops, keep, seconds)


OP_FRACTIONS = (0.3, 0.55, 0.8)
OP_OPTIONS = len(OP_FRACTIONS)  # at most this many op-level options per block


def op_options(profile: OpProfile, fractions: Sequence[float] = OP_FRACTIONS) -> list[KeepOps]:
    """``keep-ops`` options: the shortest prefixes of the units ranked by seconds per byte that save each
    fraction of the block's recompute time (NOTE [ Op-level options ])."""
    units = [u for u in profile.units if u.bytes > 0]
    ranked = sorted(units, key=lambda u: u.seconds / u.bytes, reverse=True)
    total = sum(u.seconds for u in ranked)
    options: list[KeepOps] = []
    if total <= 0:
        return options
    for f in fractions:
        m, acc = 0, 0.0
        while m < len(ranked) and acc < f * total:
            acc += ranked[m].seconds
            m += 1
        if 0 < m < len(ranked):  # keeping every unit is what "store" does
            option = keep_ops_option((i for u in ranked[:m] for i in u.ops), profile.ops)
            if option not in options:
                options.append(option)
    return options


def kept_positions(option: Option, ops: Sequence[Any]) -> frozenset[int] | None:
    """Positions in the block's op sequence ``ops`` whose outputs a selective-checkpoint option keeps;
    None for store, recompute and segments (not selective)."""
    match option:
        case KeepOps():
            return option.indices
        case SavePolicy():
            saved = SAC_SAVED_OPS[option.name]
            return frozenset(i for i, op in enumerate(ops) if keeps_output(saved, op))
    return None


def _at_least_the_recomputed_ops(costs: dict[Option, OptionCost], profile: OpProfile) -> None:
    """Raise an option's backward time so that its extra time over store is at least the forward time of
    the ops it recomputes (from the op recording). Timed alone, a block's store option can be slower than
    its recompute option by more than the recompute costs (on CPU, keeping more touches more fresh
    memory, so large convolutional blocks can time recomputing everything as free), which the step does
    not repeat: the DP would take recomputation for free."""
    store = costs[STORE]
    for option, cost in costs.items():
        kept = frozenset() if isinstance(option, Recompute) else kept_positions(option, profile.ops)
        if isinstance(option, Store) or kept is None or not cost.exact:
            continue
        floor = sum(t for i, t in enumerate(profile.seconds) if i not in kept)
        missing = store.fwd_time + store.bwd_time + floor - cost.fwd_time - cost.bwd_time
        if missing > 0:
            cost.bwd_time += missing


def measure_group(
    group: Group,
    options: Sequence[Option] = DEFAULT_OPTIONS,
    *,
    reps: int = 3,
    seed: int = 1234,
    on_option: Callable[[Option], None] | None = None,
    flop_rate: float | None = None,
    byte_rate: float | None = None,
    op_level: bool = True,
) -> dict[Option, OptionCost]:
    """Costs of ``group``'s block under each option (see the module docstring), plus the op-level
    ``keep-ops`` options of ``op_options`` when ``op_level`` (measured clocks only).

    With ``flop_rate`` (FLOP/s) and ``byte_rate`` (bytes written per second; default flop_rate / 50),
    times come from counts instead of clocks, and gradients are not compared (under FakeTensorMode there
    are no values): the ``--estimate`` cost model.
    """
    options = [STORE, *[o for o in options if not isinstance(o, Store)]]
    profile = OpProfile([], [])
    if op_level and flop_rate is None:
        profile = record_units(group, seed)
        options += op_options(profile)
    ops = profile.ops
    costs: dict[Option, OptionCost] = {}
    reference: list[torch.Tensor | None] | None = None
    # selective options that keep the same ops as an earlier one (a CNN's convolutions are all its
    # matmuls and all its projections) run the same code: measured once, the costs copied
    first_keeping: dict[frozenset[int], Option] = {}
    twins: dict[Option, Option] = {}
    for option in options:
        positions = kept_positions(option, ops) if ops else None
        twin = first_keeping.get(positions) if positions is not None else None
        if twin is not None and (twin not in costs or costs[twin].exact):
            twins[option] = twin  # (a twin not in costs kept as much as storing: so does this one)
            if on_option is not None:
                on_option(option)
            continue
        if positions is not None:
            first_keeping.setdefault(positions, option)
        run = _Run(group, option, seed)
        try:
            keep, fwd_peak, bwd_peak, grads = _measure_memory(run)
        except Exception as err:  # an option this block cannot run under (in-place input updates, ...)
            if isinstance(option, Store):
                raise RuntimeError(f"block {group.path} fails when run on its own: {err}") from err
            costs[option] = OptionCost(option, 0, 0, 0, 0.0, 0.0, exact=False)
            continue
        if reference is None or flop_rate is not None:
            reference = grads if reference is None else reference
            exact = True
        else:
            exact = same_tensors(reference, grads)
        del grads
        if not isinstance(option, (Store, Recompute)) and keep >= costs[STORE].keep:
            if on_option is not None:  # keeps as much as storing and recomputes: never better, not timed
                on_option(option)
            continue
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
        if profile.seconds:
            _at_least_the_recomputed_ops(costs, profile)
    for option, twin in twins.items():
        if twin in costs:
            costs[option] = replace(costs[twin], option=option)
    return costs
