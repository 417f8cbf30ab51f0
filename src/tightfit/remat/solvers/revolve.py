"""Binomial checkpointing (Griewank 1992; Griewank & Walther's ``revolve``) for homogeneous chains.

With ``s`` checkpoint slots (the chain input occupies one) and at most ``r`` recomputations of any step,
the longest reversible chain has ``beta(s, r) = C(s + r, s)`` steps. For ``n`` steps, with ``r`` the
smallest integer such that ``n <= beta(s, r)``, the least number of extra (non-recording) forward steps is
``r * n - beta(s + 1, r - 1)``; every step is recorded (taped) once, right before its backward.
"""

from __future__ import annotations

from functools import cache
from math import comb

from .errors import InfeasibleBudget
from .problems import Backward, Chain, ForwardCheckpoint, ForwardNoSave, ForwardTape, Free, Loss, Op, Schedule
from .simulate import simulate_chain

__all__ = ["beta", "revolve_extra_forwards", "revolve"]


def beta(s: int, r: int) -> int:
    """Longest chain reversible with ``s`` slots and ``r`` recomputations: ``C(s + r, s)`` (0 if r < 0)."""
    return comb(s + r, s) if r >= 0 and s >= 0 else 0


@cache
def revolve_extra_forwards(n: int, s: int) -> int:
    """Griewank's optimum number of extra forward steps to reverse ``n`` steps with ``s >= 1`` slots."""
    if n <= 1:
        return 0
    if s < 1:
        raise ValueError(f"reversing {n} > 1 steps needs at least one checkpoint slot, got {s}")
    r = 0
    while beta(s, r) < n:
        r += 1
    return r * n - beta(s + 1, r - 1)


def _split(n: int, s: int) -> int:
    """Steps to advance before storing the next checkpoint in an optimal binomial schedule."""
    target = revolve_extra_forwards(n, s)
    if s == 1:
        return n - 1
    for j in range(1, n):
        if j + revolve_extra_forwards(n - j, s - 1) + revolve_extra_forwards(j, s) == target:
            return j
    raise AssertionError(f"internal: no optimal split for n={n}, s={s}")


def revolve(n_steps: int, n_slots: int, fwd_time: float = 1.0, bwd_time: float = 1.0) -> Schedule:
    """Optimal binomial schedule reversing ``n_steps`` identical steps with ``n_slots`` checkpoints.

    The ops run on any ``Chain.homogeneous(n_steps, ...)``: a kept input is a checkpoint, the step being
    recorded is the working state (not a slot). ``info`` holds the forward counts; ``time``/``peak`` are
    simulated on ``Chain.homogeneous(n_steps, fwd_time, bwd_time, size=1, tape_size=0)``.

    NOTE: Revolve assumes a step is recorded (taped) only right before its reversal. In the chain model
    that holds when one tape is larger than all checkpoints together; then :func:`solve_chain` at the
    budget of this schedule's simulated peak finds the same time (tested). With small tapes the chain DP
    does strictly better by taping steps early.
    """
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    if int(n_slots) != n_slots:
        raise ValueError(f"n_slots must be an integer, got {n_slots!r}")
    n, s_tot = int(n_steps), int(n_slots)
    if n > 1 and s_tot < 1:
        raise InfeasibleBudget(s_tot, 1, "binomial schedule (slots)")
    ops: list[Op] = []
    # (lo, hi, s): reverse steps lo..hi-1 with x_lo stored, d_hi present, s slots (x_lo's included)
    stack: list = [("rev", 0, n, s_tot)]
    while stack:
        item = stack.pop()
        if item[0] == "op":
            ops.append(item[1])
            continue
        _, lo, hi, s = item
        length = hi - lo
        if length == 1:
            ops.append(ForwardTape(lo))
            if hi == n:  # the only length-1 sub-problem ending at the output: take the loss here
                ops.append(Loss())
            else:
                ops.append(Free("x", hi))
            ops.append(Backward(lo))
            continue
        j = _split(length, s)
        ops.append(ForwardCheckpoint(lo))
        ops.extend(ForwardNoSave(k) for k in range(lo + 1, lo + j))
        stack.append(("rev", lo, lo + j, s))
        stack.append(("rev", lo + j, hi, s - 1 if length - j > 1 else s))
    chain = Chain.homogeneous(n, fwd_time, bwd_time, 1.0, 0.0)
    peak, time = simulate_chain(chain, ops)
    n_fwd = sum(isinstance(o, (ForwardTape, ForwardCheckpoint, ForwardNoSave)) for o in ops)
    return Schedule(
        ops,
        time,
        peak,
        budget=None,
        solver="revolve",
        optimal=True,
        info={
            "n_slots": s_tot,
            "forward_runs": n_fwd,
            "extra_forwards": n_fwd - n,
            "closed_form_extra_forwards": revolve_extra_forwards(n, s_tot),
        },
    )
