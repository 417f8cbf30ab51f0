"""Memory-efficient backpropagation through time (Gruslys et al., NeurIPS 2016) for chains of identical steps.

Gruslys et al. split the sequence at the first stored position: ``cost(t, m) = min_y y*f + cost(t - y, m - 1)
+ cost(y, m)`` (store a hidden state after ``y`` steps), and, in their mixed variant, also allow storing a
step's internal state (its tape) instead. On identical steps the chain recurrence of :mod:`.chain_dp`
depends only on the sub-problem length and whether it ends at the loss, so it drops from ``O(T^3 M)`` to
``O(T^2 M)``: that is this solver, under the same memory model as :class:`~.problems.Chain` (hidden state
= ``x_i``, internal state = ``x_i`` + tape). ``store_hidden_only=True`` forbids keeping a tape beyond the
step being reversed (Gruslys' BPTT-HSM; with that restriction it is Revolve).
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InfeasibleBudget
from .problems import Backward, Chain, ForwardCheckpoint, ForwardNoSave, ForwardTape, Free, Loss, Op, Schedule
from .simulate import simulate_chain

__all__ = ["solve_bptt"]


def _tables(T: int, M: int, h: int, tau: int, f: float, b: float, hsm: bool):
    """``In[d, m]`` (stages s..s+d, d_{t+1} of size h) and ``Top[d, m]`` (stages L-d..L, L = the loss)."""
    inf = np.inf
    In = np.full((T + 1, M + 1), inf)
    Top = np.full((T + 1, M + 1), inf)
    need_tape = 3 * h + tau
    # interior sub-problems: a chain of d+1 real stages with x_s and d_{t+1} (size h) live
    for d in range(T):
        row = In[d]
        if need_tape <= M:
            if d == 0:
                row[need_tape:] = f + b
            elif not hsm:
                sh = h + tau
                lo = max(need_tape, sh)
                if lo <= M:
                    np.minimum(row[lo:], f + b + In[d - 1, lo - sh : M + 1 - sh], out=row[lo:])
        for jlo, thr in ((1, 3 * h), (2, 4 * h)):  # j = 1 needs 3h for the segment, j >= 2 needs 4h
            jhi = 1 if jlo == 1 else d
            lo = max(thr, h)
            if jlo > jhi or lo > M:
                continue
            j = np.arange(jlo, jhi + 1)
            cand = (j * f)[:, None] + In[d - j, lo - h : M + 1 - h] + In[j - 1, lo:]
            np.minimum(row[lo:], cand.min(axis=0), out=row[lo:])
    # sub-problems ending with the loss: stages L-d..L-1 plus the loss (x_L of size h, d_{L+1} of size 0)
    Top[0, 2 * h :] = 0.0
    for d in range(1, T + 1):
        row = Top[d]
        if not hsm or d == 1:
            sh = h + tau
            lo = max(3 * h + tau, sh)
            if lo <= M:
                np.minimum(row[lo:], f + b + Top[d - 1, lo - sh : M + 1 - sh], out=row[lo:])
        for jlo, thr in ((1, 2 * h), (2, 3 * h)):  # j = 1 needs 2h for the segment, j >= 2 needs 3h
            lo = max(thr, h)
            jhi = 1 if jlo == 1 else d
            if jlo > jhi or lo > M:
                continue
            j = np.arange(jlo, jhi + 1)
            cand = (j * f)[:, None] + Top[d - j, lo - h : M + 1 - h] + In[j - 1, lo:]
            np.minimum(row[lo:], cand.min(axis=0), out=row[lo:])
    return In, Top


def solve_bptt(
    n_steps: int,
    budget: float,
    fwd_time: float = 1.0,
    bwd_time: float = 1.0,
    state_size: float = 1.0,
    tape_size: float = 0.0,
    slots: int | None = None,
    store_hidden_only: bool = False,
) -> Schedule:
    """Fastest persistent schedule for ``n_steps`` identical steps under ``budget`` (chain memory model).

    ``state_size``: bytes of a hidden state (each ``x_i``, ``d_i`` and the output); ``tape_size``: what a
    step keeps for its backward besides its input. The schedule runs on
    ``Chain.homogeneous(n_steps, fwd_time, bwd_time, state_size, tape_size)``; equals
    :func:`solve_chain` on that chain (tested). ``slots`` defaults to exact units when the sizes are
    integers (``budget`` rounded down), else 500.
    """
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    T = int(n_steps)
    chain = Chain.homogeneous(T, fwd_time, bwd_time, state_size, tape_size)
    budget = float(budget)
    if slots is None:
        exact = float(state_size).is_integer() and float(tape_size).is_integer() and state_size > 0
        slots = max(1, int(budget)) if exact and budget >= 1 else 500
    scale = budget / slots if budget > 0 else 1.0
    h = int(math.ceil(state_size / scale))
    tau = int(math.ceil(tape_size / scale))
    M = int(slots) if budget > 0 else 0
    In, Top = _tables(T, M, h, tau, float(fwd_time), float(bwd_time), store_hidden_only)
    if not np.isfinite(Top[T, M]):
        from .chain_dp import chain_min_memory

        mb = chain_min_memory(chain)[0] if T <= 300 else None
        if mb is not None and mb <= budget:
            raise InfeasibleBudget(budget, mb, "BPTT schedule at this slot resolution (raise slots)")
        if mb is None:
            mb = _min_budget_bptt(T, h, tau, scale, fwd_time, bwd_time, store_hidden_only)
        raise InfeasibleBudget(budget, mb, "BPTT schedule")
    ops = _emit(T, M, h, tau, float(fwd_time), float(bwd_time), In, Top, store_hidden_only)
    peak, time = simulate_chain(chain, ops)
    if peak > budget * (1 + 1e-12):
        raise AssertionError(f"internal: BPTT schedule peaks at {peak} > {budget}")
    return Schedule(
        ops,
        time,
        peak,
        budget=budget,
        solver="bptt-hsm" if store_hidden_only else "bptt",
        optimal=True,
        info={"slots": M, "predicted_time": float(Top[T, M])},
    )


def _min_budget_bptt(T, h, tau, scale, f, b, hsm) -> float:
    """Smallest budget (in slots times ``scale``) at which the slot DP is feasible (bisection)."""
    lo, hi = 0, max(4 * h + tau, 1)
    while not np.isfinite(_tables(T, hi, h, tau, f, b, hsm)[1][T, hi]):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if np.isfinite(_tables(T, mid, h, tau, f, b, hsm)[1][T, mid]):
            hi = mid
        else:
            lo = mid
    return hi * scale


def _emit(T, M, h, tau, f, b, In, Top, hsm) -> list[Op]:
    """Rebuild the op sequence by re-deriving each visited state's best choice."""
    ops: list[Op] = []
    stack: list = [("top", 0, M)]  # ("in", s, t, m) or ("top", s, m); s..t stage indices

    def close(a: float, c: float) -> bool:
        return a <= c + 1e-9 * max(1.0, abs(c))

    while stack:
        item = stack.pop()
        if item[0] == "op":
            ops.append(item[1])
            continue
        if item[0] == "in":
            _, s, t, m = item
            d = t - s
            target = In[d, m]
            if m >= 3 * h + tau and (d == 0 or not hsm):
                if d == 0 and close(f + b, target):
                    ops.append(ForwardTape(s))
                    stack.extend([("op", Backward(s)), ("op", Free("x", s + 1))])
                    continue
                if d > 0 and m - h - tau >= 0 and close(f + b + In[d - 1, m - h - tau], target):
                    ops.append(ForwardTape(s))
                    stack.extend([("op", Backward(s)), ("in", s + 1, t, m - h - tau)])
                    continue
            for j in range(1, d + 1):
                thr = 3 * h if j == 1 else 4 * h
                if m >= thr and close(j * f + In[d - j, m - h] + In[j - 1, m], target):
                    break
            else:
                raise AssertionError(f"internal: no BPTT choice for interior state {item}")
        else:
            _, s, m = item
            d = T - s
            target = Top[d, m]
            if d == 0:
                ops.append(Loss())
                continue
            if (not hsm or d == 1) and m >= 3 * h + tau and close(f + b + Top[d - 1, m - h - tau], target):
                ops.append(ForwardTape(s))
                stack.extend([("op", Backward(s)), ("top", s + 1, m - h - tau)])
                continue
            for j in range(1, d + 1):
                thr = 2 * h if j == 1 else 3 * h
                if m >= thr and close(j * f + Top[d - j, m - h] + In[j - 1, m], target):
                    break
            else:
                raise AssertionError(f"internal: no BPTT choice for top state {item}")
        # checkpoint x_s, run j steps without tape, then the right part, then the left part
        ops.append(ForwardCheckpoint(s))
        ops.extend(ForwardNoSave(k) for k in range(s + 1, s + j))
        stack.append(("in", s, s + j - 1, m))
        stack.append(("in", s + j, t, m - h) if item[0] == "in" else ("top", s + j, m - h))
    return ops
