"""Abstract execution of schedules: returns the true peak memory and total time, rejects invalid schedules.

Every solver's output goes through :func:`simulate`; the memory model is the one documented in
:mod:`.problems` (chains) and :mod:`.dag` (DAGs). Sizes are summed exactly (no discretisation).
"""

from __future__ import annotations

from .dag import joint_graph
from .errors import InvalidSchedule
from .problems import (
    Backward,
    Chain,
    Compute,
    Dag,
    ForwardCheckpoint,
    ForwardNoSave,
    ForwardTape,
    Free,
    Loss,
    Release,
    Schedule,
    store_all_ops,
)

__all__ = ["simulate", "simulate_chain", "simulate_dag"]


def simulate(problem: Chain | Dag, schedule: Schedule | list) -> tuple[float, float]:
    """Execute ``schedule`` on ``problem`` abstractly; return ``(peak, time)``.

    Raises :class:`InvalidSchedule` naming the first failing step (a value used but not in memory, a
    value computed twice while alive, an unknown stage/option, or work left undone at the end).
    """
    ops = schedule.ops if isinstance(schedule, Schedule) else list(schedule)
    if isinstance(problem, Chain):
        return simulate_chain(problem, ops)
    if isinstance(problem, Dag):
        return simulate_dag(problem, ops)
    raise TypeError(f"simulate expects a Chain or a Dag, got {type(problem).__name__}")


def simulate_chain(chain: Chain, ops: list) -> tuple[float, float]:
    """Chain simulator (memory model: :mod:`.problems` NOTE). Returns ``(peak, time)``."""
    L = chain.length
    opts = [chain.stage_options(i) for i in range(L)]
    x = {0}  # live activations x_i
    tape: dict[int, int] = {}  # stage -> option of its live tape
    grad: set[int] = set()  # live gradients d_i
    cur = chain.size_of_x(0)
    peak = cur
    time = 0.0

    def fail(k: int, op: object, why: str) -> InvalidSchedule:
        return InvalidSchedule(k, op, why)

    def stage_ok(k: int, op: object, i: int) -> None:
        if not isinstance(i, int) or not 0 <= i < L:
            raise fail(k, op, f"stage {i!r} is not in 0..{L - 1}")

    for k, op in enumerate(ops):
        if isinstance(op, (ForwardNoSave, ForwardCheckpoint, ForwardTape)):
            i = op.stage
            stage_ok(k, op, i)
            if i not in x:
                raise fail(k, op, f"needs x_{i} (input of stage {i}), which is not in memory")
            if i + 1 in x:
                raise fail(k, op, f"x_{i + 1} is already in memory")
            out = chain.size_of_x(i + 1)
            if isinstance(op, ForwardTape):
                if not 0 <= op.option < len(opts[i]):
                    raise fail(k, op, f"stage {i} has options 0..{len(opts[i]) - 1}, not {op.option}")
                if i in tape:
                    raise fail(k, op, f"the tape of stage {i} is already in memory")
                o = opts[i][op.option]
                peak = max(peak, cur + out + o.tape_size + o.fwd_overhead)
                cur += out + o.tape_size
                tape[i] = op.option
                time += o.fwd_time
            else:
                peak = max(peak, cur + out + chain.fwd_overhead[i])
                cur += out
                time += chain.fwd_time[i]
                if isinstance(op, ForwardNoSave):
                    x.discard(i)
                    cur -= chain.size_of_x(i)
            x.add(i + 1)
        elif isinstance(op, Loss):
            if L not in x:
                raise fail(k, op, f"needs the chain output x_{L}, which is not in memory")
            if L in grad:
                raise fail(k, op, f"d_{L} is already in memory")
            peak = max(peak, cur + chain.output_size)
            x.discard(L)
            grad.add(L)
        elif isinstance(op, Backward):
            i = op.stage
            stage_ok(k, op, i)
            if i + 1 not in grad:
                raise fail(k, op, f"needs d_{i + 1} (gradient of the output of stage {i}), not in memory")
            if i not in tape:
                raise fail(k, op, f"needs the tape of stage {i}, which is not in memory")
            if i not in x:
                raise fail(k, op, f"needs x_{i} (input of stage {i}), which is not in memory")
            if i in grad:
                raise fail(k, op, f"d_{i} is already in memory")
            o = opts[i][tape[i]]
            peak = max(peak, cur + chain.size_of_x(i) + o.bwd_overhead)
            cur += chain.size_of_x(i) - o.tape_size - chain.size_of_x(i + 1) - chain.size_of_x(i)
            del tape[i]
            grad.discard(i + 1)
            x.discard(i)
            grad.add(i)
            time += o.bwd_time
        elif isinstance(op, Free):
            i = op.stage
            if op.kind == "x" and i in x:
                x.discard(i)
                cur -= chain.size_of_x(i)
            elif op.kind == "tape" and i in tape:
                cur -= opts[i][tape.pop(i)].tape_size
            elif op.kind == "grad" and i in grad:
                grad.discard(i)
                cur -= chain.size_of_x(i)
            else:
                raise fail(k, op, f"{op.kind} of stage {i} is not in memory (kind must be x, tape or grad)")
        else:
            raise fail(k, op, f"{type(op).__name__} is not a chain operation")
    if 0 not in grad:
        raise InvalidSchedule(len(ops), "end", "the schedule ends before d_0 (the input gradient) exists")
    return peak, time


def simulate_dag(dag: Dag, ops: list) -> tuple[float, float]:
    """DAG simulator on the joint forward+backward graph (see :mod:`.dag`). Returns ``(peak, time)``."""
    g = joint_graph(dag)
    live: set[int] = set()
    done = [False] * g.n
    cur = peak = time = 0.0
    for k, op in enumerate(ops):
        if isinstance(op, Compute):
            j = op.node
            if not isinstance(j, int) or not 0 <= j < g.n:
                raise InvalidSchedule(k, op, f"node {j!r} is not in 0..{g.n - 1}")
            if j in live:
                raise InvalidSchedule(k, op, f"{g.names[j]} is already in memory")
            missing = [g.names[u] for u in g.deps[j] if u not in live]
            if missing:
                raise InvalidSchedule(k, op, f"{g.names[j]} needs {', '.join(missing)}, not in memory")
            peak = max(peak, cur + g.size[j])
            cur += g.size[j]
            live.add(j)
            done[j] = True
            time += g.cost[j]
        elif isinstance(op, Release):
            j = op.node
            if j not in live:
                raise InvalidSchedule(k, op, f"node {j!r} is not in memory")
            live.discard(j)
            cur -= g.size[j]
        else:
            raise InvalidSchedule(k, op, f"{type(op).__name__} is not a DAG operation (Compute/Release)")
    missing = [g.names[j] for j in range(g.n) if not done[j]]
    if missing:
        raise InvalidSchedule(len(ops), "end", f"never computed: {', '.join(missing[:5])}")
    return peak, time


def store_all_peak(chain: Chain) -> float:
    """Peak of plain autograd (tape every stage with option 0, no recomputation) under the model."""
    return simulate(chain, Schedule(store_all_ops(chain), 0.0, 0.0))[0]
