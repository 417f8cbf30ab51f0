"""Optimal persistent checkpointing of heterogeneous chains (Rotor's dynamic program, with Rockmate options).

NOTE (recurrence). Stage ``L`` is the loss (input ``x_L``, no tape, zero time). ``C(s, t, m)`` is the least
time to go from "``x_s`` and ``d_{t+1}`` in memory" to "``d_s`` in memory" for stages ``s..t``, when ``m``
slots are available to everything the sub-problem holds (``x_s`` and ``d_{t+1}`` included). Either

* tape ``s`` with option ``o``: ``ForwardTape(s, o)``, solve ``(s+1, t)`` with ``m - x_s - tape_o`` slots
  (or free ``x_{s+1}`` when ``s == t``), then ``Backward(s)``; or
* keep ``x_s`` as a checkpoint and run ``s..s'-1`` without tape up to a later checkpoint ``x_{s'}``
  (``s < s' <= t``), solve ``(s', t)`` with ``m - x_s`` slots, then ``(s, s'-1)`` with ``m`` slots.

Each option is feasible only if every step's transient memory (module NOTE in :mod:`.problems`) fits in
``m``. ``O(L^2 M)`` states, ``O(L + K)`` choices each: ``O(L^3 M)`` time, vectorised over ``m`` and ``s'``.

NOTE (discretisation). Sizes are rounded UP to ``budget / slots`` units, so a schedule that fits in slots
fits in bytes; the returned ``peak`` is the exact simulated peak in bytes (``<= budget``). Rounding can
make a budget that is feasible in bytes infeasible in slots; then the exact min-peak schedule (computed
without rounding) is returned when it fits, flagged ``optimal=False``. If nothing fits,
:class:`InfeasibleBudget` carries the exact smallest feasible budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InfeasibleBudget
from .problems import (
    Backward,
    Chain,
    ForwardCheckpoint,
    ForwardNoSave,
    ForwardTape,
    Free,
    Loss,
    Op,
    Schedule,
)
from .simulate import simulate_chain

__all__ = ["solve_chain", "chain_min_memory", "StageDecision", "stage_decisions"]


@dataclass
class _Tables:
    """Per-stage arrays of a chain, indexed by stage ``0..L`` (stage ``L`` = the loss)."""

    A: np.ndarray  # sizes of x_0..x_{L+1} (x_{L+1} = 0), length L+2
    ft: np.ndarray  # (L+1, K) taped forward time (inf where a stage has fewer options)
    bt: np.ndarray  # (L+1, K) backward time
    tb: np.ndarray  # (L+1, K) tape size
    ovf: np.ndarray  # (L+1, K) taped forward overhead
    ovb: np.ndarray  # (L+1, K) backward overhead
    fn: np.ndarray  # (L+1,) no-tape forward time (fn[L] = 0)
    ovfn: np.ndarray  # (L+1,) no-tape forward overhead


def _tables(chain: Chain, scale: float | None) -> _Tables:
    """Stage arrays; with ``scale`` (bytes per slot) sizes are rounded up to whole slots."""
    L = chain.length
    opts = [chain.stage_options(i) for i in range(L)]
    K = max(len(o) for o in opts)

    def q(v: float) -> float:
        return float(math.ceil(v / scale)) if scale is not None else float(v)

    A = np.array([q(chain.size_of_x(i)) for i in range(L + 1)] + [0.0])
    ft = np.full((L + 1, K), np.inf)
    bt = np.full((L + 1, K), np.inf)
    tb = np.zeros((L + 1, K))
    ovf = np.zeros((L + 1, K))
    ovb = np.zeros((L + 1, K))
    for i, os_ in enumerate(opts):
        for o, op in enumerate(os_):
            ft[i, o], bt[i, o] = op.fwd_time, op.bwd_time
            tb[i, o], ovf[i, o], ovb[i, o] = q(op.tape_size), q(op.fwd_overhead), q(op.bwd_overhead)
    ft[L, 0] = bt[L, 0] = 0.0  # the loss: one option, no tape, no time
    fn = np.array(list(chain.fwd_time) + [0.0])
    ovfn = np.array([q(v) for v in chain.fwd_overhead] + [0.0])  # type: ignore[union-attr]
    return _Tables(A, ft, bt, tb, ovf, ovb, fn, ovfn)


def _fwd_need(T: _Tables, L: int) -> np.ndarray:
    """``PM[s, s']``: memory (without ``d_{t+1}``) to run ``s..s'-1`` without tape keeping ``x_s``."""
    A, ovfn = T.A, T.ovfn
    g = A[: L + 1] + A[1 : L + 2] + ovfn  # x_k + x_{k+1} + overhead while stage k runs
    PM = np.full((L + 1, L + 2), np.inf)
    for s in range(L):
        run = g[s]
        for sp in range(s + 1, L + 1):
            if sp - 1 > s:
                run = max(run, A[s] + g[sp - 1])
            PM[s, sp] = run
    return PM


def _solve_slots(T: _Tables, L: int, M: int) -> tuple[np.ndarray, np.ndarray]:
    """The DP table ``Ct[t, s, m] = C(s, t, m)`` and ``D[s, u, m] = C(s, u, m) + (forward time of s..u)``.

    Layouts keep the rows the checkpoint option reads contiguous; ``D`` folds the segment's no-tape
    forward time into the table. Choices are not stored: :func:`_choice_slots` recomputes them for the
    few states a reconstruction visits (saves an argmin pass and an ``L^2 M`` int table).
    """
    N = L + 1
    K = T.ft.shape[1]
    A = T.A.astype(np.int64)
    tb = T.tb.astype(np.int64)
    Ct = np.full((N + 1, N + 1, M + 1), np.inf)  # Ct[t, s, m] = C(s, t, m): rows s contiguous for fixed t
    D = np.full((N + 1, N + 1, M + 1), np.inf)  # D[s, u, m] = C(s, u, m) + sum fn[s..u]
    PM = _fwd_need(T, L)
    SF = np.concatenate([[0.0], np.cumsum(T.fn)])  # SF[k] = sum fn[0..k-1]
    buf = np.empty((N, M + 1))
    mask = np.empty((N, M + 1), dtype=bool)
    marange = np.arange(M + 1, dtype=np.int64)
    fst = np.full((N + 1, N + 1), M + 1, dtype=np.int64)  # fst[t, s]: first m with C(s, t, m) finite
    for d in range(N):
        for s in range(N - d):
            t = s + d
            As = int(A[s])
            best = Ct[t, s]
            for o in range(K):  # tape stage s with option o
                val = T.ft[s, o] + T.bt[s, o]
                if not np.isfinite(val):
                    continue
                lo = int(
                    math.ceil(
                        max(
                            As + A[t + 1] + A[s + 1] + tb[s, o] + T.ovf[s, o],
                            2 * As + tb[s, o] + A[s + 1] + T.ovb[s, o],
                        )
                    )
                )
                if d == 0:
                    if lo <= M:
                        np.minimum(best[lo:], val, out=best[lo:])
                    continue
                shift = As + int(tb[s, o])
                lo = max(lo, shift)
                if lo <= M:
                    np.minimum(best[lo:], val + Ct[t, s + 1, lo - shift : M + 1 - shift], out=best[lo:])
            if d > 0 and As <= M:  # keep x_s, run without tape up to checkpoint s' in s+1..t
                thr = np.ceil(PM[s, s + 1 : t + 1] + A[t + 1])
                # C is non-increasing in m: skip the m where every candidate is still infinite
                lo = int(np.min(np.maximum(np.maximum(fst[t, s + 1 : t + 1] + As, fst[s:t, s]), thr)))
                lo = max(lo, As)
                if lo <= M:
                    w = M + 1 - lo
                    b = buf[:d, :w]
                    np.add(Ct[t, s + 1 : t + 1, lo - As : M + 1 - As], D[s, s:t, lo:], out=b)
                    if thr[-1] > lo:  # some segments need more than lo: mask m < thr
                        mk = mask[:d, :w]
                        np.less(marange[None, lo:], thr[:, None], out=mk)
                        np.copyto(b, np.inf, where=mk)
                    np.minimum(best[lo:], b.min(axis=0), out=best[lo:])
            fin = np.flatnonzero(best < np.inf)
            if fin.size:
                fst[t, s] = fin[0]
            D[s, t] = best + (SF[t + 1] - SF[s])
    return Ct, D


def _choice_slots(T: _Tables, L: int, Ct: np.ndarray, D: np.ndarray, s: int, t: int, m: int) -> int:
    """Recompute the best choice of state ``(s, t, m)`` (``o < K``: tape option; ``K + s'``: checkpoint)."""
    K = T.ft.shape[1]
    A = T.A
    target = Ct[t, s, m]
    tol = 1e-9 * max(1.0, abs(target))
    for o in range(K):
        val = T.ft[s, o] + T.bt[s, o]
        if not np.isfinite(val):
            continue
        need = max(
            A[s] + A[t + 1] + A[s + 1] + T.tb[s, o] + T.ovf[s, o],
            2 * A[s] + T.tb[s, o] + A[s + 1] + T.ovb[s, o],
        )
        if need > m:
            continue
        if t > s:
            r = int(m - A[s] - T.tb[s, o])
            if r < 0:
                continue
            val = val + Ct[t, s + 1, r]
        if val <= target + tol:
            return o
    PM = _fwd_need_row(T, L, s)
    As = int(A[s])
    for sp in range(s + 1, t + 1):
        if m >= As and math.ceil(PM[sp] + A[t + 1]) <= m:
            if Ct[t, sp, m - As] + D[s, sp - 1, m] <= target + tol:
                return K + sp
    return -1


def _fwd_need_row(T: _Tables, L: int, s: int) -> np.ndarray:
    """Row ``s`` of :func:`_fwd_need`."""
    A = T.A
    g = A[: L + 1] + A[1 : L + 2] + T.ovfn
    row = np.full(L + 2, np.inf)
    run = g[s]
    for sp in range(s + 1, L + 1):
        if sp - 1 > s:
            run = max(run, A[s] + g[sp - 1])
        row[sp] = run
    return row


def _emit(T: _Tables, L: int, choice, root_m) -> list[Op]:
    """Rebuild the op sequence from ``choice(s, t, m) -> int`` (encoding: :func:`_choice_slots`)."""
    K = T.ft.shape[1]
    ops: list[Op] = []
    stack: list = [("solve", 0, L, root_m)]
    while stack:
        item = stack.pop()
        if item[0] == "op":
            ops.append(item[1])
            continue
        _, s, t, m = item
        c = choice(s, t, m)
        if c < 0:
            raise AssertionError(f"internal: no choice recorded for sub-problem ({s}, {t}, {m})")
        if c < K:
            if s == L:
                ops.append(Loss())
                continue
            ops.append(ForwardTape(s, int(c)))
            later = [("op", Backward(s))]
            if s == t:
                later.append(("op", Free("x", s + 1)))
            else:
                later.append(("solve", s + 1, t, m - T.A[s] - T.tb[s, c]))
            stack.extend(later)
        else:
            sp = int(c - K)
            ops.append(ForwardCheckpoint(s))
            ops.extend(ForwardNoSave(k) for k in range(s + 1, sp))
            stack.append(("solve", s, sp - 1, m))
            stack.append(("solve", sp, t, m - T.A[s]))
    return ops


def chain_min_memory(chain: Chain) -> tuple[float, list[Op]]:
    """Exact smallest peak (bytes) of any persistent schedule of ``chain``, and one schedule reaching it.

    The same recurrence as the time DP with ``max`` in place of ``+`` and no discretisation; ties are broken
    towards less time only approximately (lowest peak first).
    """
    L = chain.length
    N = L + 1
    T = _tables(chain, None)
    A = T.A
    K = T.ft.shape[1]
    PM = _fwd_need(T, L)
    Mm = np.full((N + 1, N + 1), np.inf)
    ch = np.full((N + 1, N + 1), -1, dtype=np.int64)
    for d in range(N):
        for s in range(N - d):
            t = s + d
            best, arg = np.inf, -1
            for o in range(K):
                if not np.isfinite(T.ft[s, o] + T.bt[s, o]):
                    continue
                need = max(
                    A[s] + A[t + 1] + A[s + 1] + T.tb[s, o] + T.ovf[s, o],
                    2 * A[s] + T.tb[s, o] + A[s + 1] + T.ovb[s, o],
                )
                if d > 0:
                    need = max(need, A[s] + T.tb[s, o] + Mm[s + 1, t])
                if need < best:
                    best, arg = need, o
            if d > 0:
                cand = np.maximum(
                    np.maximum(PM[s, s + 1 : t + 1] + A[t + 1], A[s] + Mm[s + 1 : t + 1, t]), Mm[s, s:t]
                )
                j = int(np.argmin(cand))
                if cand[j] < best:
                    best, arg = float(cand[j]), K + s + 1 + j
            Mm[s, t] = best
            ch[s, t] = arg
    ops = _emit(T, L, lambda s, t, m: int(ch[s, t]), 0)
    peak, _ = simulate_chain(chain, ops)
    return float(peak), ops


def solve_chain(chain: Chain, budget: float, slots: int = 500) -> Schedule:
    """Fastest persistent schedule of ``chain`` with peak ``<= budget`` (memory model: :mod:`.problems`).

    ``budget`` is in the chain's size unit (bytes) and covers ``x_0``, activations, tapes, gradients and
    overheads (not parameters). Memory is discretised into ``slots`` units of ``budget / slots``, sizes
    rounded up (``optimal=True`` then means optimal for the rounded sizes). When plain autograd with
    each stage's fastest option fits (checked in exact bytes) it is returned as is: nothing is faster.
    Returns a :class:`Schedule` whose ``time``/``peak`` are simulated; raises
    :class:`InfeasibleBudget` (with the exact ``min_budget``) when no persistent schedule fits.
    """
    if not isinstance(chain, Chain):
        raise TypeError(f"solve_chain expects a Chain, got {type(chain).__name__}")
    budget = float(budget)
    if not math.isfinite(budget):
        raise ValueError(f"budget must be a finite number, got {budget!r}")
    if int(slots) != slots or slots < 1:
        raise ValueError(f"slots must be a positive integer, got {slots!r}")
    slots = int(slots)
    L = chain.length
    # Autograd with the fastest option everywhere is optimal when it fits (no recomputation at all):
    # checked in exact bytes, since rounding to slots could otherwise miss it at budgets near the top.
    fastest = [
        min(range(len(o)), key=lambda k, o=o: o[k].fwd_time + o[k].bwd_time)
        for o in (chain.stage_options(i) for i in range(L))
    ]
    ops_all = (
        [ForwardTape(i, fastest[i]) for i in range(L)] + [Loss()] + [Backward(i) for i in reversed(range(L))]
    )
    peak_all, time_all = simulate_chain(chain, ops_all)
    if peak_all <= budget:
        return Schedule(
            ops_all,
            time_all,
            peak_all,
            budget=budget,
            solver="store_all",
            optimal=True,
            info={"slots": slots},
        )
    if budget > 0:
        T = _tables(chain, budget / slots)
        Ct, D = _solve_slots(T, L, slots)
        if np.isfinite(Ct[L, 0, slots]):
            ops = _emit(T, L, lambda s, t, m: _choice_slots(T, L, Ct, D, s, t, int(m)), slots)
            peak, time = simulate_chain(chain, ops)
            if peak > budget * (1 + 1e-12):
                raise AssertionError(f"internal: slot DP schedule peaks at {peak} > budget {budget}")
            return Schedule(
                ops,
                time,
                peak,
                budget=budget,
                solver="chain_dp",
                optimal=True,
                info={"slots": slots, "predicted_time": float(Ct[L, 0, slots])},
            )
    min_budget, ops = chain_min_memory(chain)
    if min_budget <= budget:
        peak, time = simulate_chain(chain, ops)
        return Schedule(
            ops,
            time,
            peak,
            budget=budget,
            solver="chain_min_memory",
            optimal=False,
            info={"slots": slots, "reason": "budget infeasible after rounding to slots"},
        )
    raise InfeasibleBudget(budget, min_budget, "persistent chain schedule")


@dataclass(frozen=True)
class StageDecision:
    """What a chain schedule does with one stage, for executors built on ``torch.utils.checkpoint``.

    ``taped``: the stage's first forward runs with tape (its activations are stored, never recomputed);
    otherwise it runs without tape first and is recomputed before its backward. ``option``: the tape
    option of the (last) taped forward right before its backward. ``checkpoint_input``: in the first
    forward pass, ``x_stage`` is kept as an input checkpoint (a segment boundary: the stage is run with
    ``ForwardCheckpoint``; for taped stages the input is kept anyway). ``forward_runs``: how many times the
    stage's forward runs in total (1 for taped stages; 2 for a singly recomputed one; more when nested).
    """

    stage: int
    taped: bool
    option: int
    checkpoint_input: bool
    forward_runs: int


def stage_decisions(schedule: Schedule | list[Op], n_stages: int | None = None) -> list[StageDecision]:
    """Per-stage summary of a chain schedule (see :class:`StageDecision`), in stage order.

    A single-level plan (each stage taped or recomputed once) maps onto ``torch.utils.checkpoint``: the
    maximal runs of non-taped stages starting at a ``checkpoint_input`` stage are checkpointed segments.
    Nested plans (``forward_runs > 2``) need nested checkpoints.
    """
    ops = schedule.ops if isinstance(schedule, Schedule) else list(schedule)
    stages = [op.stage for op in ops if isinstance(op, (ForwardNoSave, ForwardCheckpoint, ForwardTape))]
    L = n_stages if n_stages is not None else (max(stages) + 1 if stages else 0)
    first: dict[int, Op] = {}
    runs = [0] * L
    last_opt = [-1] * L
    for op in ops:
        if isinstance(op, (ForwardNoSave, ForwardCheckpoint, ForwardTape)):
            first.setdefault(op.stage, op)
            runs[op.stage] += 1
            if isinstance(op, ForwardTape):
                last_opt[op.stage] = op.option
    out = []
    for i in range(L):
        f = first.get(i)
        if f is None:
            raise ValueError(f"stage {i} is never run forward in this schedule")
        out.append(
            StageDecision(
                i,
                isinstance(f, ForwardTape),
                last_opt[i],
                isinstance(f, (ForwardCheckpoint, ForwardTape)),
                runs[i],
            )
        )
    return out
