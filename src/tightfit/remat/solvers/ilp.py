"""Checkmate's rematerialization ILP (Jain et al., MLSys 2020) on the joint graph, solved by HiGHS.

NOTE (formulation). Joint nodes ``0..T-1`` in topological order; stage ``t`` computes node ``t`` and any
recomputations. Binary ``R[t,i]`` (i computed in stage t, ``i <= t``), ``S[t,i]`` (i kept from stage
t-1 into t, ``i < t``), ``FREE[t,i,k]`` (i freed right after computing its user k in stage t); continuous
``U[t,k]`` (memory while node k is computed in stage t). Minimise ``sum cost_i R[t,i]`` subject to
``R[t,t] = 1``; ``R[t,k] <= R[t,i] + S[t,i]`` for each edge ``i -> k``; ``S[t+1,i] <= S[t,i] + R[t,i]``;
``R[t,i] + S[t,i] <= 1`` (never recompute a value that is held; valid, it only removes waste);
``U[t,0] = size_0 R[t,0] + sum_i size_i S[t,i]``, ``U[t,k+1] = U[t,k] + size_{k+1} R[t,k+1] -
sum_{i in deps(k)} size_i FREE[t,i,k]``; ``U <= budget``; FREE is 1 exactly when none of its "hazards"
(k not computed, i kept for the next stage, a later user of i computed in the stage) holds, linearised
with two inequalities as in Checkmate. The schedule is rebuilt from ``R`` and ``S`` with eager frees, so
its simulated peak is at most the ILP's ``U``.

NOTE (approximation). ``exact=False`` solves the LP relaxation (its objective is a valid lower bound),
rounds ``S`` at thresholds 0.1..0.9 (plus "keep nothing"), computes the cheapest ``R`` for each fixed
``S`` (Checkmate's two-phase rounding), simulates each candidate and returns the fastest that fits. If
none fits, the LP is re-solved with the memory bound tightened to 0.9, 0.75 and 0.5 of the budget
(Checkmate used a 0.9 margin) to leave the rounding room.
"""

from __future__ import annotations

import time as _time

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from .dag import JointGraph, joint_graph
from .errors import InfeasibleBudget
from .problems import Compute, Dag, Op, Release, Schedule
from .simulate import simulate_dag

__all__ = ["solve_dag_ilp", "schedule_from_rs"]


class _Model:
    """Column indices and sparse rows of the Checkmate ILP for one joint graph."""

    def __init__(self, g: JointGraph, budget: float | None) -> None:
        T = g.n
        self.g, self.T = g, T
        col = 0
        self.R: dict[tuple[int, int], int] = {}
        self.S: dict[tuple[int, int], int] = {}
        self.F: dict[tuple[int, int, int], int] = {}
        self.U: dict[tuple[int, int], int] = {}
        for t in range(T):
            for i in range(t + 1):
                self.R[t, i] = col
                col += 1
            for i in range(t):
                self.S[t, i] = col
                col += 1
            for k in range(t + 1):
                for i in g.deps[k]:
                    self.F[t, i, k] = col
                    col += 1
            for k in range(t + 1):
                self.U[t, k] = col
                col += 1
        self.Bcol = col if budget is None else None  # budget variable for the min-memory variant
        self.ncol = col + (1 if budget is None else 0)
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        lo: list[float] = []
        hi: list[float] = []
        r = 0

        def add(entries: list[tuple[int, float]], lb: float, ub: float) -> None:
            nonlocal r
            for c, v in entries:
                rows.append(r)
                cols.append(c)
                vals.append(v)
            lo.append(lb)
            hi.append(ub)
            r += 1

        size = g.size
        inf = np.inf
        for t in range(T):
            for k in range(t + 1):
                for i in g.deps[k]:
                    add([(self.R[t, k], 1.0), (self.R[t, i], -1.0), (self.S[t, i], -1.0)], -inf, 0.0)
            if t + 1 < T:
                for i in range(t + 1):
                    e = [(self.S[t + 1, i], 1.0), (self.R[t, i], -1.0)]
                    if i < t:
                        e.append((self.S[t, i], -1.0))
                    add(e, -inf, 0.0)
            for i in range(t):
                add([(self.R[t, i], 1.0), (self.S[t, i], 1.0)], -inf, 1.0)
            kept = [(self.S[t, i], -size[i]) for i in range(t)]
            add([(self.U[t, 0], 1.0), (self.R[t, 0], -size[0])] + kept, 0.0, 0.0)
            for k in range(t):
                e = [(self.U[t, k + 1], 1.0), (self.U[t, k], -1.0), (self.R[t, k + 1], -size[k + 1])]
                e += [(self.F[t, i, k], size[i]) for i in g.deps[k]]
                add(e, 0.0, 0.0)
            for k in range(t + 1):
                for i in g.deps[k]:
                    later = [j for j in g.users[i] if k < j <= t]
                    haz = [(self.R[t, j], 1.0) for j in later]
                    if t + 1 < T:
                        haz.append((self.S[t + 1, i], 1.0))
                    n_h = 1 + len(haz)
                    f = self.F[t, i, k]
                    add([(f, 1.0), (self.R[t, k], -1.0)] + haz, 0.0, inf)  # FREE >= 1 - hazards
                    add([(f, float(n_h)), (self.R[t, k], -1.0)] + haz, -inf, n_h - 1.0)  # FREE <= 1 - haz/n_h
            if self.Bcol is not None:
                for k in range(t + 1):
                    add([(self.U[t, k], 1.0), (self.Bcol, -1.0)], -inf, 0.0)
        self.A = csr_array((vals, (rows, cols)), shape=(r, self.ncol))
        self.lo, self.hi = np.array(lo), np.array(hi)
        lb = np.zeros(self.ncol)
        ub = np.ones(self.ncol)
        for t in range(T):
            lb[self.R[t, t]] = 1.0
        for c in self.U.values():
            ub[c] = np.inf if budget is None else float(budget)
        if self.Bcol is not None:
            ub[self.Bcol] = np.inf
        self.bounds = Bounds(lb, ub)
        self.integrality = np.ones(self.ncol)
        for c in self.U.values():
            self.integrality[c] = 0
        if self.Bcol is not None:
            self.integrality[self.Bcol] = 0
        self.cost = np.zeros(self.ncol)
        for (_t, i), c in self.R.items():
            self.cost[c] = g.cost[i]

    def solve(self, objective: np.ndarray, integral: bool, time_limit: float | None):
        opts = {"disp": False}
        if time_limit is not None:
            opts["time_limit"] = float(time_limit)
        return milp(
            objective,
            constraints=LinearConstraint(self.A, self.lo, self.hi),
            integrality=self.integrality if integral else np.zeros(self.ncol),
            bounds=self.bounds,
            options=opts,
        )

    def rows_of(self, x: np.ndarray, thr: float = 0.5) -> tuple[list[list[int]], list[set[int]]]:
        R = [[i for i in range(t + 1) if x[self.R[t, i]] > thr] for t in range(self.T)]
        S = [{i for i in range(t) if x[self.S[t, i]] > thr} for t in range(self.T)] + [set()]
        return R, S


def schedule_from_rs(g: JointGraph, R: list[list[int]], S: list[set[int]]) -> list[Op]:
    """Ops for a staged schedule: stage ``t`` computes ``R[t]`` in order, keeps ``S[t+1]``; eager frees."""
    ops: list[Op] = []
    live: set[int] = set()
    T = g.n
    for t in range(T):
        for i in sorted(live - S[t]):
            ops.append(Release(i))
            live.discard(i)
        comp = [k for k in sorted(R[t]) if k not in live]
        keep = S[t + 1] if t + 1 < len(S) else set()
        for idx, k in enumerate(comp):
            ops.append(Compute(k))
            live.add(k)
            later = comp[idx + 1 :]
            for i in list(g.deps[k]) + [k]:
                if i in live and i not in keep and not any(i in g.deps[j] for j in later):
                    ops.append(Release(i))
                    live.discard(i)
        for i in sorted(live - keep):
            ops.append(Release(i))
            live.discard(i)
    return ops


def _min_r(g: JointGraph, S: list[set[int]]) -> list[list[int]]:
    """Cheapest ``R`` for a fixed ``S``: stage t computes t, what S[t+1] adds, and their missing deps."""
    R = []
    for t in range(g.n):
        need = {t} | {i for i in S[t + 1] if i not in S[t]}
        stack = list(need)
        while stack:
            k = stack.pop()
            for i in g.deps[k]:
                if i not in S[t] and i not in need:
                    need.add(i)
                    stack.append(i)
        R.append(sorted(need))
    return R


def _round_s(m: _Model, x: np.ndarray, thr: float) -> list[set[int]]:
    """Round S at ``thr``, then drop entries not reachable (S[t+1] must come from S[t] or R[t])."""
    S = [{i for i in range(t) if x[m.S[t, i]] >= thr} for t in range(m.T)] + [set()]
    return S  # _min_r recomputes R so that every S[t+1] \ S[t] is computed in stage t: always valid


def _min_budget(m: _Model, dag: Dag, time_limit: float | None) -> tuple[float, bool]:
    mm = _Model(m.g, None)
    obj = np.zeros(mm.ncol)
    obj[mm.Bcol] = 1.0
    res = mm.solve(obj, True, time_limit)
    if res.x is None:
        raise RuntimeError(f"HiGHS found no schedule even without a budget: {res.message}")
    R, S = mm.rows_of(res.x)
    peak, _ = simulate_dag(dag, schedule_from_rs(m.g, R, S))
    return float(peak), res.status == 0


def solve_dag_ilp(dag: Dag, budget: float, exact: bool = True, time_limit: float | None = 60.0) -> Schedule:
    """Checkmate's ILP for ``dag`` under ``budget`` (memory model: :mod:`.dag`), solved with HiGHS.

    ``exact=True``: the MILP with ``time_limit`` seconds; ``optimal`` says whether HiGHS proved optimality,
    ``lower_bound`` is its dual bound (``gap`` the relative gap). ``exact=False``: LP relaxation + two-phase
    rounding; ``lower_bound`` is the LP optimum. ``time``/``peak`` are simulated. Raises
    :class:`InfeasibleBudget` with the smallest budget found by minimising peak memory with the same model.
    """
    if not isinstance(dag, Dag):
        raise TypeError(f"solve_dag_ilp expects a Dag, got {type(dag).__name__}")
    budget = float(budget)
    g = joint_graph(dag)
    t0 = _time.perf_counter()
    m = _Model(g, budget)
    build = _time.perf_counter() - t0
    res = m.solve(m.cost, exact, time_limit)
    info = {
        "build_s": build,
        "solve_s": _time.perf_counter() - t0 - build,
        "n_vars": m.ncol,
        "n_rows": m.A.shape[0],
        "status": res.status,
        "message": res.message,
    }
    if res.x is None:
        if res.status == 2 or (res.status == 1 and "nfeasible" in str(res.message)):
            mb, proven = _min_budget(m, dag, time_limit)
            raise InfeasibleBudget(
                budget,
                mb,
                "Checkmate schedule"
                + ("" if proven else " (min_budget not proven minimal: solver time limit)"),
            )
        raise RuntimeError(f"HiGHS returned no solution ({res.message}); raise time_limit or use exact=False")
    if exact:
        R, S = m.rows_of(res.x)
        ops = schedule_from_rs(g, R, S)
        peak, tm = simulate_dag(dag, ops)
        bound = getattr(res, "mip_dual_bound", None)
        if bound is None or not np.isfinite(bound):
            bound = None
        return Schedule(
            ops,
            tm,
            peak,
            budget=budget,
            solver="checkmate_ilp",
            optimal=res.status == 0,
            lower_bound=None if bound is None else min(float(bound), tm),
            info=info,
        )
    best = None
    lp_bound = float(res.fun)
    # Checkmate solves the relaxation with a memory margin so that rounding has room; try a few margins
    for margin in (1.0, 0.9, 0.75, 0.5):
        if margin < 1.0:
            m.bounds.ub[[c for c in m.U.values()]] = margin * budget
            r2 = m.solve(m.cost, False, time_limit)
            m.bounds.ub[[c for c in m.U.values()]] = budget
            if r2.x is None:
                break
            x = r2.x
        else:
            x = res.x
        for thr in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01):
            S = _round_s(m, x, thr)
            ops = schedule_from_rs(g, _min_r(g, S), S)
            peak, tm = simulate_dag(dag, ops)
            if peak <= budget * (1 + 1e-12) and (best is None or tm < best[0]):
                best = (tm, peak, ops, (margin, thr))
        if best is not None:
            break
    if best is None:
        raise RuntimeError(
            f"LP rounding found no schedule within budget {budget:g} (the LP itself is feasible); "
            "use exact=True or solve_dag_lowerset"
        )
    info["margin"], info["threshold"] = best[3]
    return Schedule(
        best[2],
        best[0],
        best[1],
        budget=budget,
        solver="checkmate_lp_rounding",
        optimal=False,
        lower_bound=min(lp_bound, best[0]),
        info=info,
    )
