"""Brute-force references for tests: enumerate schedules explicitly and score each with the simulator.

These share no recurrence or memory arithmetic with the solvers: every candidate's time and peak come
from :func:`.simulate.simulate`. Exponential; for tiny problems only.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterator

from .dag import joint_graph
from .problems import (
    Backward,
    Chain,
    Dag,
    ForwardCheckpoint,
    ForwardNoSave,
    ForwardTape,
    Free,
    Loss,
    Op,
)
from .simulate import simulate_chain, simulate_dag

__all__ = [
    "chain_persistent_schedules",
    "brute_chain",
    "brute_chain_min_memory",
    "brute_dag_staged",
    "brute_dag_lowerset",
]


def chain_persistent_schedules(chain: Chain) -> Iterator[list[Op]]:
    """Every persistent schedule of ``chain`` (Rotor's class), as explicit op lists.

    Persistent: to backprop stages ``s..t`` from ``x_s``, either tape ``s`` (any option) and recurse on
    ``s+1..t``, or keep ``x_s`` and run without tape to some later ``x_{s'}``, recurse on ``s'..t`` then
    ``s..s'-1``. Stage ``L`` is the loss.
    """
    L = chain.length
    n_opt = [len(chain.stage_options(i)) for i in range(L)]

    def gen(s: int, t: int) -> Iterator[list[Op]]:
        if s == L:
            yield [Loss()]
            return
        for o in range(n_opt[s]):
            if s == t:
                yield [ForwardTape(s, o), Free("x", s + 1), Backward(s)]
            else:
                for rest in gen(s + 1, t):
                    yield [ForwardTape(s, o), *rest, Backward(s)]
        for sp in range(s + 1, t + 1):
            head: list[Op] = [ForwardCheckpoint(s)] + [ForwardNoSave(k) for k in range(s + 1, sp)]
            right = list(gen(sp, t))
            for a, b in itertools.product(right, gen(s, sp - 1)):
                yield head + a + b

    yield from gen(0, L)


def brute_chain(chain: Chain, budget: float) -> tuple[float, float, list[Op]] | None:
    """``(time, peak, ops)`` of the fastest persistent schedule with simulated peak ``<= budget``, or None."""
    best = None
    for ops in chain_persistent_schedules(chain):
        peak, time = simulate_chain(chain, ops)
        if peak <= budget and (best is None or time < best[0] or (time == best[0] and peak < best[1])):
            best = (time, peak, ops)
    return best


def brute_chain_min_memory(chain: Chain) -> float:
    """Smallest simulated peak over all persistent schedules."""
    return min(simulate_chain(chain, ops)[0] for ops in chain_persistent_schedules(chain))


def brute_dag_staged(dag: Dag, budget: float) -> float | None:
    """Least time over Checkmate's staged schedules on the joint graph (Dijkstra over explicit states).

    Stage ``t`` visits joint nodes ``0..t`` in order, computing any subset that includes ``t`` (inputs must
    be in memory); after computing node ``k`` it may free any of ``k``'s inputs or ``k`` itself; at the end
    of a stage it keeps any subset of what is in memory. Memory while computing = live + the new value.
    Frees happen at the earliest point the ILP allows (after a value's last use in the stage), which is
    the only place a free can help.
    """
    g = joint_graph(dag)
    T = g.n
    size = g.size

    def mem(live: frozenset[int]) -> float:
        return sum(size[i] for i in live)

    start = (0, 0, frozenset())
    dist = {start: 0.0}
    heap = [(0.0, 0, start)]
    counter = 1
    while heap:
        d, _, state = heapq.heappop(heap)
        if d > dist.get(state, math.inf):
            continue
        t, k, live = state
        if t == T:
            return d
        nxt: list[tuple[float, tuple]] = []
        if k <= t:
            if k < t:
                nxt.append((0.0, (t, k + 1, live)))
            if k not in live and all(u in live for u in g.deps[k]) and mem(live) + size[k] <= budget:
                base = live | {k}
                cands = [u for u in (*g.deps[k], k)]
                for r in range(len(cands) + 1):
                    for drop in itertools.combinations(cands, r):
                        nxt.append((g.cost[k], (t, k + 1, base - frozenset(drop))))
        else:  # end of stage t: keep any subset
            items = sorted(live)
            for r in range(len(items) + 1):
                for keep in itertools.combinations(items, r):
                    nxt.append((0.0, (t + 1, 0, frozenset(keep))))
        for c, s in nxt:
            nd = d + c
            if nd < dist.get(s, math.inf):
                dist[s] = nd
                heapq.heappush(heap, (nd, counter, s))
                counter += 1
    return None


def brute_dag_lowerset(dag: Dag, budget: float) -> float | None:
    """Least simulated time over every chain of lower sets (all canonical strategies) within ``budget``."""
    from .lowerset import lower_sets, strategy_ops

    sets = lower_sets(dag)
    full = (1 << dag.n) - 1
    inner = [m for m in sets if m not in (0, full)]
    best = None

    # every chain of lower sets = a subset of the inner sets that is totally ordered by inclusion
    def chains(prev: int, start: int) -> Iterator[list[int]]:
        yield []
        for i in range(start, len(inner)):
            m = inner[i]
            if m != prev and m & prev == prev:
                for rest in chains(m, i + 1):
                    yield [m, *rest]

    for ch in chains(0, 0):
        peak, time = simulate_dag(dag, strategy_ops(dag, [*ch, full]))
        if peak <= budget and (best is None or time < best):
            best = time
    return best
