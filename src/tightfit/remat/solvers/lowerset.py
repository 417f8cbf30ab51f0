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


class _Ctx:
    """Per-DAG data shared by all segments: users, bitmasks, gradient-blob sizes, pending-blob sums."""

    def __init__(self, dag: Dag) -> None:
        n = dag.n
        self.dag, self.n, self.full = dag, n, (1 << n) - 1
        self.users = _users(dag)
        self.deps = [list(d) for d in dag.deps]
        self.bwd_deps = [list(d) for d in dag.bwd_deps]  # type: ignore[union-attr]
        self.depmask = [sum(1 << u for u in d) for d in dag.deps]
        self.size = [float(x) for x in dag.size]
        self.bsize = [float(sum(self.size[u] for u in dag.deps[w])) for w in range(n)]
        self._pending: dict[int, float] = {}

    def pending(self, Lp: int) -> float:
        """Bytes of the gradient blobs alive when the backward reaches ``Lp``: users outside, deps inside."""
        if Lp not in self._pending:
            self._pending[Lp] = sum(
                self.bsize[w] for w in range(self.n) if not (Lp >> w) & 1 and self.depmask[w] & Lp
            )
        return self._pending[Lp]


class _Seg:
    """One segment ``V = L' \\ L`` (see module NOTE): local peak, kept bytes, recompute time, and ops."""

    __slots__ = ("fwd", "bwd", "need", "kept", "recompute")

    def __init__(self, ctx: _Ctx, L: int, Lp: int, emit: bool = False) -> None:
        n, users, deps, size, bsize = ctx.n, ctx.users, ctx.deps, ctx.size, ctx.bsize
        last = Lp == ctx.full
        V = []
        rest = Lp & ~L
        while rest:
            low = rest & -rest
            V.append(low.bit_length() - 1)
            rest ^= low
        inV = set(V)
        K = set(V) if last else {u for u in V if any(not (Lp >> w) & 1 for w in users[u])}
        fwd: list[Op] = []
        bwd: list[Op] = []
        # forward phase: compute V in order, free what is neither kept nor needed later in the segment
        cur = peak_f = 0.0
        pending_users = {u: sum(1 for w in users[u] if w in inV) for u in V}
        for v in V:
            if emit:
                fwd.append(Compute(v))
            cur += size[v]
            peak_f = max(peak_f, cur)
            for u in (*deps[v], v):  # a value goes when its last user in the segment has run
                if u in inV:
                    if u != v:
                        pending_users[u] -= 1
                    if pending_users[u] == 0 and u not in K:
                        if emit:
                            fwd.append(Release(u))
                        cur -= size[u]
        # backward phase: recompute V \\ K, then the backwards of V in reverse order with eager frees
        cur = sum(size[u] for u in K) + ctx.pending(Lp)
        peak_b = cur
        for v in V:
            if v not in K:
                if emit:
                    bwd.append(Compute(v))
                cur += size[v]
        peak_b = max(peak_b, cur)
        bw_need = dict.fromkeys(V, 0)
        for x in V:
            for u in ctx.bwd_deps[x]:
                if u in inV:
                    bw_need[u] += 1
        for u in V:
            if bw_need[u] == 0:
                if emit:
                    bwd.append(Release(u))
                cur -= size[u]
        done: set[int] = set()
        for v in reversed(V):
            if emit:
                bwd.append(Compute(bwd_index(n, v)))
            cur += bsize[v]
            peak_b = max(peak_b, cur)
            done.add(v)
            for w in (*users[v], v):  # a gradient blob goes once the backwards of all its targets ran
                if all(not (Lp >> u) & 1 or u in done for u in deps[w]):
                    if emit:
                        bwd.append(Release(bwd_index(n, w)))
                    cur -= bsize[w]
            for u in ctx.bwd_deps[v]:
                if u in inV:
                    bw_need[u] -= 1
                    if bw_need[u] == 0:
                        if emit:
                            bwd.append(Release(u))
                        cur -= size[u]
        self.fwd, self.bwd = fwd, bwd
        self.need = max(peak_f, peak_b)
        self.kept = 0.0 if last else float(sum(size[u] for u in K))
        self.recompute = 0.0 if last else float(sum(ctx.dag.fwd_time[v] for v in V if v not in K))


def strategy_ops(dag: Dag, strategy: list[int]) -> list[Op]:
    """Ops of the canonical strategy ``strategy`` (increasing lower-set bitmasks ending with all nodes)."""
    ctx = _Ctx(dag)
    segs = [_Seg(ctx, a, b, emit=True) for a, b in zip([0, *strategy[:-1]], strategy)]
    ops: list[Op] = []
    for s in segs:
        ops += s.fwd
    for s in reversed(segs):
        ops += s.bwd
    return ops


_SEG_CACHE: dict[tuple, dict[tuple[int, int], _Seg]] = {}


def _segments(dag: Dag, fam: list[int], max_segment: int) -> dict[tuple[int, int], _Seg]:
    """Stats of every nested pair of the family (segments of at most ``max_segment`` nodes); cached."""
    key = (dag.to_json(), tuple(fam), max_segment)
    if key in _SEG_CACHE:
        return _SEG_CACHE[key]
    ctx = _Ctx(dag)
    seg: dict[tuple[int, int], _Seg] = {}
    counts = [bin(m).count("1") for m in fam]
    for a, A in enumerate(fam):
        for b in range(a + 1, len(fam)):
            if counts[b] - counts[a] > max_segment:
                break  # fam is sorted by size
            B = fam[b]
            if B != A and A & B == A:
                seg[a, b] = _Seg(ctx, A, B)
    if len(_SEG_CACHE) >= 4:
        _SEG_CACHE.pop(next(iter(_SEG_CACHE)))
    _SEG_CACHE[key] = seg
    return seg


def _users(dag: Dag) -> list[list[int]]:
    users: list[list[int]] = [[] for _ in range(dag.n)]
    for v, d in enumerate(dag.deps):
        for u in d:
            users[u].append(v)
    return users


def solve_dag_lowerset(
    dag: Dag,
    budget: float,
    exact: bool | None = None,
    slots: int = 200,
    max_lowersets: int = 3000,
    max_segment: int | None = None,
) -> Schedule:
    """Fastest canonical strategy (Kusumoto et al.) for ``dag`` under ``budget`` (memory model: :mod:`.dag`).

    ``exact=None`` uses all lower sets when there are at most ``max_lowersets`` of them, else the
    approximate family; ``exact=True`` insists (ValueError if too many). In the approximate family a
    segment ``L' \\ L`` has at most ``max_segment`` nodes (default: no limit up to 100 nodes, else
    ``3 sqrt(n)``), which keeps the pair count near-linear. Memory is discretised into ``slots`` units;
    each segment's peak and kept bytes are rounded up (safe in bytes: a sum of rounded-up parts);
    ``time``/``peak`` are simulated. Raises :class:`InfeasibleBudget`
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
        if max_segment is None:
            max_segment = n if n <= 100 else int(3 * math.sqrt(n))
    else:
        max_segment = n
    full = (1 << n) - 1
    M = int(slots)
    unit = budget / M if budget > 0 else 1.0
    F = len(fam)
    pos = {m: i for i, m in enumerate(fam)}
    seg = _segments(dag, fam, max_segment)
    V = pos[full]
    # exact min peak over the family (no discretisation)
    mm = np.full(F, np.inf)
    mm[V] = 0.0
    for a in range(F - 1, -1, -1):
        for b in range(a + 1, F):
            s = seg.get((a, b))
            if s is not None:
                mm[a] = min(mm[a], max(s.need, s.kept + mm[b]))
    if mm[pos[0]] > budget:
        raise InfeasibleBudget(
            budget,
            float(mm[pos[0]]),
            "lower-set strategy" + ("" if is_exact else " in the approximate family"),
        )
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
            need, kept = math.ceil(s.need / unit), math.ceil(s.kept / unit)  # round up: safe in bytes
            lo = max(need, kept)
            if lo > M:
                continue
            cand = s.recompute + best[b, lo - kept : M + 1 - kept]
            np.minimum(row[lo:], cand, out=row[lo:])
    if np.isfinite(best[pos[0], M]):
        strategy = []
        a, r = pos[0], M
        while a != V:
            for b in range(a + 1, F):
                s = seg.get((a, b))
                if s is None:
                    continue
                need, kept = math.ceil(s.need / unit), math.ceil(s.kept / unit)
                if r >= max(need, kept) and s.recompute + best[b, r - kept] <= best[a, r] + 1e-9 * max(
                    1.0, abs(best[a, r])
                ):
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
                if s is not None and max(s.need, s.kept + mm[b]) <= mm[a]:
                    strategy.append(fam[b])
                    a = b
                    break
        optimal = False
    ops = strategy_ops(dag, strategy)
    peak, tm = simulate_dag(dag, ops)
    if peak > budget * (1 + 1e-12):
        raise AssertionError(f"internal: lower-set schedule peaks at {peak} > budget {budget}")
    return Schedule(
        ops,
        tm,
        peak,
        budget=budget,
        solver="lowerset" if is_exact else "lowerset_approx",
        optimal=optimal,
        info={"n_sets": F, "strategy": strategy, "exact_family": is_exact, "slots": M},
    )
