"""Kusumoto et al. (NeurIPS 2019): recomputation strategies as increasing chains of lower sets of a DAG.

NOTE (strategy and memory). A strategy is ``{} = L_0 < L_1 < ... < L_k = V`` with each ``L_i`` closed
under predecessors. Forward: for each segment ``V_i = L_i \\ L_{i-1}`` compute its nodes in order, keep
``K_i`` = its nodes with a user outside ``L_i`` (all of ``V_k``), free the rest after their last use.
Backward, ``i = k..1``: recompute ``V_i \\ K_i``, run the backwards of ``V_i`` in reverse order, freeing
every gradient blob and forward value after its last use. While segment ``i`` runs (either phase) memory
is ``sum_{j<i} |K_j|`` plus the segment's own live values (in the backward also the gradient blobs
flowing in from later segments), so the peak is ``max_i (prefix_i + local_i(L_{i-1}, L_i))`` and a DP from
``V`` down to ``{}`` over (lower set, memory left) is exact for the family of lower sets it is given.

Exact: all lower sets (exponential in the worst case). Approximate (large graphs): topological prefixes
plus the ancestor closure of every node; the same DP over that smaller family (time never below the
exact optimum since the family is a subset).
"""

from __future__ import annotations

import math

import numpy as np

from .dag import bwd_index
from .errors import InfeasibleBudget
from .problems import Compute, Dag, Op, Release, Schedule
from .simulate import simulate_dag

__all__ = ["lower_sets", "solve_dag_lowerset", "strategy_ops"]


def lower_sets(dag: Dag, limit: int | None = None) -> list[int] | None:
    """All lower sets of ``dag`` as bitmasks (sorted by size), or None when there are more than ``limit``."""
    n = dag.n
    depmask = [sum(1 << u for u in d) for d in dag.deps]
    out: list[int] = []
    stack = [(0, 0)]  # (next node to decide, mask)
    while stack:
        v, mask = stack.pop()
        if v == n:
            out.append(mask)
            if limit is not None and len(out) > limit:
                return None
            continue
        stack.append((v + 1, mask))
        if depmask[v] & mask == depmask[v]:
            stack.append((v + 1, mask | (1 << v)))
    out.sort(key=lambda m: (bin(m).count("1"), m))
    return out


def _approx_family(dag: Dag) -> list[int]:
    n = dag.n
    fam = {(1 << k) - 1 for k in range(n + 1)}
    anc = [0] * n
    for v in range(n):
        a = 1 << v
        for u in dag.deps[v]:
            a |= anc[u]
        anc[v] = a
        fam.add(a)
    return sorted(fam, key=lambda m: (bin(m).count("1"), m))


class _Seg:
    """Ops and costs of one segment ``V = L' \\ L`` (see module NOTE)."""

    __slots__ = ("fwd", "bwd", "need", "kept", "recompute")

    def __init__(self, dag: Dag, users: list[list[int]], L: int, Lp: int, sizes: list[np.ndarray]) -> None:
        n = dag.n
        last = Lp == (1 << n) - 1
        V = [v for v in range(n) if (Lp >> v) & 1 and not (L >> v) & 1]
        inV = set(V)
        K = set(V) if last else {u for u in V if any(not (Lp >> w) & 1 for w in users[u])}
        bsize = [[float(sum(sz[u] for u in dag.deps[w])) for w in range(n)] for sz in sizes]
        fwd: list[Op] = []
        cur = [0.0] * len(sizes)
        peak_f = [0.0] * len(sizes)
        live: set[int] = set()
        pending_users = {u: sum(1 for w in users[u] if w in inV) for u in V}
        for v in V:
            fwd.append(Compute(v))
            for q, sz in enumerate(sizes):
                cur[q] += sz[v]
                peak_f[q] = max(peak_f[q], cur[q])
            live.add(v)
            for u in dag.deps[v]:
                if u in inV:
                    pending_users[u] -= 1
            for u in [*dag.deps[v], v]:
                if u in inV and u in live and u not in K and pending_users[u] == 0:
                    fwd.append(Release(u))
                    live.discard(u)
                    for q, sz in enumerate(sizes):
                        cur[q] -= sz[u]
        # backward phase of this segment
        bwd: list[Op] = []
        grad_done = {w for w in range(n) if not (Lp >> w) & 1}  # later segments are done
        blobs = {w for w in range(n) if not (Lp >> w) & 1 and any((Lp >> u) & 1 for u in dag.deps[w])}
        cur = [sum(sz[u] for u in K) + sum(bs[w] for w in blobs) for sz, bs in zip(sizes, bsize)]
        peak_b = list(cur)
        flive = set(K)
        for v in V:
            if v not in flive:
                bwd.append(Compute(v))
                flive.add(v)
                for q, sz in enumerate(sizes):
                    cur[q] += sz[v]
                    peak_b[q] = max(peak_b[q], cur[q])
        bw_need = {u: 0 for u in V}
        for x in V:
            for u in dag.bwd_deps[x]:  # type: ignore[index]
                if u in inV:
                    bw_need[u] += 1

        def release_fwd() -> None:
            for u in sorted(flive):
                if bw_need[u] == 0:
                    bwd.append(Release(u))
                    flive.discard(u)
                    for q, sz in enumerate(sizes):
                        cur[q] -= sz[u]

        release_fwd()
        for v in reversed(V):
            bwd.append(Compute(bwd_index(n, v)))
            for q, bs in enumerate(bsize):
                cur[q] += bs[v]
                peak_b[q] = max(peak_b[q], cur[q])
            grad_done.add(v)
            blobs.add(v)
            for u in dag.bwd_deps[v]:  # type: ignore[index]
                if u in inV:
                    bw_need[u] -= 1
            for w in [*users[v], v]:
                if w in blobs and all(u in grad_done for u in dag.deps[w]):
                    bwd.append(Release(bwd_index(n, w)))
                    blobs.discard(w)
                    for q, bs in enumerate(bsize):
                        cur[q] -= bs[w]
            release_fwd()
        self.fwd, self.bwd = fwd, bwd
        self.need = [max(a, b) for a, b in zip(peak_f, peak_b)]
        self.kept = [0.0 if last else float(sum(sz[u] for u in K)) for sz in sizes]
        self.recompute = 0.0 if last else float(sum(dag.fwd_time[v] for v in V if v not in K))


def strategy_ops(dag: Dag, strategy: list[int]) -> list[Op]:
    """Ops of the canonical strategy ``strategy`` (increasing lower-set bitmasks ending with all nodes)."""
    users = _users(dag)
    sizes = [np.asarray(dag.size, dtype=float)]
    segs = [_Seg(dag, users, a, b, sizes) for a, b in zip([0, *strategy[:-1]], strategy)]
    ops: list[Op] = []
    for s in segs:
        ops += s.fwd
    for s in reversed(segs):
        ops += s.bwd
    return ops


def _users(dag: Dag) -> list[list[int]]:
    users: list[list[int]] = [[] for _ in range(dag.n)]
    for v, d in enumerate(dag.deps):
        for u in d:
            users[u].append(v)
    return users


def solve_dag_lowerset(dag: Dag, budget: float, exact: bool | None = None, slots: int = 200,
                       max_lowersets: int = 3000) -> Schedule:
    """Fastest canonical strategy (Kusumoto et al.) for ``dag`` under ``budget`` (memory model: :mod:`.dag`).

    ``exact=None`` uses all lower sets when there are at most ``max_lowersets`` of them, else the
    approximate family; ``exact=True`` insists (ValueError if too many). Memory is discretised into
    ``slots`` units, sizes rounded up; ``time``/``peak`` are simulated. Raises :class:`InfeasibleBudget`
    with the exact smallest peak over the family.
    """
    if not isinstance(dag, Dag):
        raise TypeError(f"solve_dag_lowerset expects a Dag, got {type(dag).__name__}")
    budget = float(budget)
    if int(slots) != slots or slots < 1:
        raise ValueError(f"slots must be a positive integer, got {slots!r}")
    n = dag.n
    fam = lower_sets(dag, max_lowersets) if exact in (None, True) else None
    if fam is None and exact:
        raise ValueError(f"more than {max_lowersets} lower sets: use exact=False or raise max_lowersets")
    is_exact = fam is not None
    if fam is None:
        fam = _approx_family(dag)
    full = (1 << n) - 1
    users = _users(dag)
    M = int(slots)
    unit = budget / M if budget > 0 else 1.0
    qsize = np.array([math.ceil(s / unit) for s in dag.size], dtype=float)
    sizes = [np.asarray(dag.size, dtype=float), qsize]
    F = len(fam)
    pos = {m: i for i, m in enumerate(fam)}
    # segment stats for every nested pair
    seg: dict[tuple[int, int], _Seg] = {}
    for a in range(F):
        A = fam[a]
        for b in range(a + 1, F):
            B = fam[b]
            if B != A and A & B == A:
                seg[a, b] = _Seg(dag, users, A, B, sizes)
    V = pos[full]
    # exact min peak over the family (no discretisation)
    mm = np.full(F, np.inf)
    mm[V] = 0.0
    for a in range(F - 1, -1, -1):
        for b in range(a + 1, F):
            s = seg.get((a, b))
            if s is not None:
                mm[a] = min(mm[a], max(s.need[0], s.kept[0] + mm[b]))
    if mm[pos[0]] > budget:
        raise InfeasibleBudget(budget, float(mm[pos[0]]),
                               "lower-set strategy" + ("" if is_exact else " in the approximate family"))
    best = np.full((F, M + 1), np.inf)
    best[V, :] = 0.0
    for a in range(F - 1, -1, -1):
        if a == V:
            continue
        row = best[a]
        for b in range(a + 1, F):
            s = seg.get((a, b))
            if s is None:
                continue
            need, kept = int(s.need[1]), int(s.kept[1])
            lo = max(need, kept)
            if lo > M:
                continue
            cand = s.recompute + best[b, lo - kept:M + 1 - kept]
            np.minimum(row[lo:], cand, out=row[lo:])
    if np.isfinite(best[pos[0], M]):
        strategy = []
        a, r = pos[0], M
        while a != V:
            for b in range(a + 1, F):
                s = seg.get((a, b))
                if s is None:
                    continue
                need, kept = int(s.need[1]), int(s.kept[1])
                if r >= max(need, kept) and s.recompute + best[b, r - kept] <= best[a, r] + 1e-9 * max(
                        1.0, abs(best[a, r])):
                    strategy.append(fam[b])
                    a, r = b, r - kept
                    break
            else:
                raise AssertionError("internal: lower-set reconstruction failed")
        optimal = is_exact
    else:  # feasible in bytes but not after rounding to slots: take the min-peak strategy
        strategy = []
        a = pos[0]
        while a != V:
            for b in range(a + 1, F):
                s = seg.get((a, b))
                if s is not None and max(s.need[0], s.kept[0] + mm[b]) <= mm[a]:
                    strategy.append(fam[b])
                    a = b
                    break
        optimal = False
    ops = strategy_ops(dag, strategy)
    peak, tm = simulate_dag(dag, ops)
    if peak > budget * (1 + 1e-12):
        raise AssertionError(f"internal: lower-set schedule peaks at {peak} > budget {budget}")
    return Schedule(ops, tm, peak, budget=budget, solver="lowerset" if is_exact else "lowerset_approx",
                    optimal=optimal, info={"n_sets": F, "strategy": strategy, "exact_family": is_exact,
                                           "slots": M})
