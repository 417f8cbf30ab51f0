"""The chain DP that plans real models: predict a per-block assignment's peak and step time from measured
block costs, and find the fastest assignment under a budget. Pure numpy (no torch): ``tightfit.remat``
measures the costs (``tightfit.remat.measure``, ``tightfit.remat.reads``) and applies the result.

NOTE [ The memory model ]
  Blocks run in order 0..L-1 in the forward and in reverse in the backward. With option o_i for block i
  (costs from ``tightfit.remat.measure``), K_i = sum_{j<i} keep_j and G_i = gradient bytes of the
  parameters of blocks after i (already computed when block i's backward runs), the live bytes peak at
      forward of block i:    A + K_i + fwd_peak_i
      backward of block i:   A + K_i + keep_i + G_i + bwd_peak_i
      the head (loss, end):  H + K_L
  A and H are what the blocks do not explain (parameters, gradients of the other parameters, optimizer
  state, inputs, embeddings, logits, the loss and its backward). They are fitted so that the model
  reproduces the MEASURED peaks of two whole steps, no remat and every block recomputed (the affine
  constant of ``tightfit.remat.Planner``). The model is approximate (the output of a block is counted as
  kept until its own backward; in-place gradient accumulation is not modelled), so plans are verified
  by measuring them, and the internal budget is lowered when a plan measures over the budget.

NOTE [ Segments ]
  A segment i..j checkpointed as ONE region (``tightfit.remat.segments``) keeps only its entry: K grows
  by keep_i of the whole-block recompute option, instead of one keep per block, plus the tensors made
  before block i that blocks i+1..j or the glue code between them read and nothing after block j reads
  (a stacked RNN's other layers' state; the per-step outputs an LSTM's glue stacks before its head): the
  region holds them as its inputs until its backward, where they would have been freed after their last
  reader's forward (``tightfit.remat.reads`` records who reads what). Its forward runs every
  block without saving (peak A + K + max fwd_peak); its backward recomputes blocks i..j storing
  everything, so the backward of block m in it peaks at
      A + K_i + entry_i + sum_{i<=l<=m} store keep_l + G_m + store bwd_peak_m.
  Its extra time is that of recomputing each block once (the sum of their recompute options' extra).

NOTE [ The solver ]
  Constraints only depend on the prefix sum K_i, so a dynamic program over blocks with K discretised in
  ``slots`` units (rounded up, so a plan the DP accepts satisfies the model) finds the plan of least
  predicted time exactly: O(L * (options + segment lengths) * slots), where only the reachable slots
  that satisfy the constraints (a prefix) are visited. Its last row holds, per amount kept after the
  forward (K_L), the fastest plan keeping that much; with ``keep_tolerance`` the solver returns, of the
  plans within that fraction of the fastest step time, the one keeping least (on a long RNN, where many
  plans tie in time, the fastest one stores every block the budget allows; the one keeping least leaves
  that memory free after the forward and lowers every backward term).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from tightfit.remat.options import (
    IN_SEGMENT,
    RECOMPUTE,
    STORE,
    InSegment,
    Option,
    Segment,
    Store,
)

Assignment = list[Option]  # one option per block call, in forward order


@dataclass
class OptionCost:
    """Measured costs of one block under one option (bytes and seconds)."""

    option: Option
    keep: int
    fwd_peak: int
    bwd_peak: int
    fwd_time: float
    bwd_time: float
    exact: bool = True
    # its extra time over store may be negative (a conversion that runs faster than plain autograd);
    # recompute options are clamped at zero (timed alone they can measure faster than storing)
    may_save_time: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "option": self.option.key}


@dataclass(frozen=True)
class Read:
    """A read of a tensor made earlier in the forward: when it was made and when it is read last."""

    made: int  # event time of the call that made it (NOTE [ Event times ] in ``tightfit.remat.reads``)
    tensor: int  # its identity in this recording
    nbytes: int  # bytes of its storage
    last: int  # event time of its last read


def _costed(option: Option) -> Option:
    """The measured option whose costs ``option`` uses: a segment's first block is recomputed (its entry is
    its inputs), a later block of a segment is stored while recomputed."""
    match option:
        case Segment():
            return RECOMPUTE
        case InSegment():
            return STORE
        case Option():  # a measured option (remat's, or a planner's combined ones): costed as itself
            return option
    raise TypeError(f"not a remat option: {option!r}")


@dataclass
class ChainCosts:
    """Per-block option costs (``costs[i][option]``), per-block later-gradient bytes and the constants."""

    costs: list[dict[Option, OptionCost]]
    later_grads: list[int]  # G_i
    base_time: float  # measured step time without remat
    # per event time (block k at 2k + 1, the glue before block g at 2g): what it reads of tensors made
    # earlier in the forward (``tightfit.remat.reads``); empty: segments hold their first block's inputs only
    reads: list[list[Read]] = field(default_factory=list)
    A: float = 0.0
    H: float = 0.0
    time_scale: float = 1.0  # measured / predicted extra time of a whole step (Planner calibrates on GPUs)
    # solve returns, of the plans predicted within this fraction of the fastest one's step time, the one
    # keeping least after the forward (NOTE [ The solver ])
    keep_tolerance: float = 0.0
    _segments: dict[tuple[int, int], tuple[int, int, int] | None] = field(default_factory=dict, repr=False)
    _entering_bytes: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def options(self, i: int) -> list[Option]:
        return [o for o, c in self.costs[i].items() if c.exact]

    def extra_time(self, i: int, option: Option) -> float:
        if isinstance(option, (Segment, InSegment)):
            option = RECOMPUTE  # every block of a segment is recomputed once
        c, s = self.costs[i][option], self.costs[i][STORE]
        extra = c.fwd_time + c.bwd_time - s.fwd_time - s.bwd_time
        return self.time_scale * (extra if c.may_save_time else max(0.0, extra))

    def keep(self, i: int, option: Option) -> int:
        """Bytes block i keeps for the backward under ``option`` (a segment keeps its entry only)."""
        if isinstance(option, InSegment):
            return 0
        return self.costs[i][_costed(option)].keep

    def segment_lengths(self) -> list[int]:
        """Segment lengths the DP tries: every one up to 16 on short chains, a geometric set on long ones
        (RNN time steps), up to 128 blocks."""
        n = len(self.costs)
        lengths = range(2, 17) if n <= 64 else (2, 3, 4, 6, 8, 11, 16)
        return [m for m in (*lengths, 23, 32, 45, 64, 90, 128) if m <= n]

    def _segment_terms(self, i: int, length: int) -> tuple[int, int, int] | None:
        """(entry keep, forward peak term, backward peak term) of a segment, above A + K (NOTE); None when
        blocks i..i+length-1 cannot form one (past the end, or an option not exact)."""
        key = (i, length)
        if key not in self._segments:
            self._segments[key] = self._segment_terms_uncached(i, length)
        return self._segments[key]

    def _segment_terms_uncached(self, i: int, length: int) -> tuple[int, int, int] | None:
        if i + length > len(self.costs) or not self.costs[i][RECOMPUTE].exact:
            return None
        if not all(self.costs[m][STORE].exact for m in range(i, i + length)):
            return None
        entry = self.costs[i][RECOMPUTE].keep + self._entering(i, i + length)
        fwd = max(self.costs[m][RECOMPUTE].fwd_peak for m in range(i, i + length))
        acc, bwd = 0, 0
        for m in range(i, i + length):
            s = self.costs[m][STORE]
            acc += s.keep
            bwd = max(bwd, acc + self.later_grads[m] + s.bwd_peak)
        return entry, fwd, entry + bwd

    def _entering(self, start: int, stop: int) -> int:
        """Bytes of the tensors made before block ``start`` that blocks start+1..stop-1 or the glue between
        blocks start..stop-1 read, and nothing from the glue after block stop-1 on reads (block start's own
        inputs are in its keep), each tensor once: the segment holds them until its backward."""
        if not self.reads:
            return 0
        sums = self._entering_bytes.get(start)
        if sums is None or stop - start >= len(sums):
            until = max(stop, min(len(self.costs), start + max(self.segment_lengths(), default=2)))
            sums = self._entering_bytes[start] = self._entering_walk(start, until)
        return sums[stop - start]

    def _entering_walk(self, start: int, until: int) -> list[int]:
        """``_entering(start, stop)`` for stop = start..until, at index stop - start, in one pass."""
        first = 2 * start + 1
        own = {r.tensor for r in self.reads[first]}
        seen: set[int] = set()
        pending: list[tuple[int, int, int]] = []  # (last read, tensor, bytes), a heap on the last read
        total, sums = 0, [0]
        for stop in range(start + 1, until + 1):
            for time in range(max(first + 1, 2 * stop - 2), 2 * stop):  # glue before block stop-1, the block
                for r in self.reads[time]:
                    if r.made < first and r.tensor not in own and r.tensor not in seen:
                        seen.add(r.tensor)
                        heapq.heappush(pending, (r.last, r.tensor, r.nbytes))
            while pending and pending[0][0] < 2 * stop:
                total += heapq.heappop(pending)[2]
            sums.append(total)
        return sums

    # -- the model ----------------------------------------------------------------------------------
    def terms(self, assignment: Sequence[Option]) -> tuple[int, int]:
        """(head term K_L, body term max over forward/backward events) without the constants."""
        k = 0
        body = 0
        i = 0
        while i < len(assignment):
            option = assignment[i]
            if isinstance(option, Segment):
                length = option.length
                terms = self._segment_terms(i, length)
                if terms is None:
                    raise ValueError(f"blocks {i}..{i + length - 1} cannot form a segment")
                entry, fwd, bwd = terms
                body = max(body, k + fwd, k + bwd)
                k += entry
                i += length
                continue
            c = self.costs[i][_costed(option)]
            body = max(body, k + c.fwd_peak, k + c.keep + self.later_grads[i] + c.bwd_peak)
            k += c.keep
            i += 1
        return k, body

    def peak(self, assignment: Sequence[Option]) -> int:
        head, body = self.terms(assignment)
        return int(math.ceil(max(self.H + head, self.A + body)))

    def time(self, assignment: Sequence[Option]) -> float:
        return self.base_time + sum(self.extra_time(i, o) for i, o in enumerate(assignment))

    def fit(
        self,
        store_plan: Sequence[Option],
        store_peak: int,
        frugal_plan: Sequence[Option],
        frugal_peak: int,
    ) -> None:
        """Set A and H from the measured peaks of two plans (see the NOTE)."""
        head_s, _ = self.terms(store_plan)
        head_f, body_f = self.terms(frugal_plan)
        self.H = store_peak - head_s
        self.A = frugal_peak - body_f
        if self.H + head_f > frugal_peak:
            self.H = frugal_peak - head_f

    def learned(self, assignment: Sequence[Option], measured: int) -> ChainCosts:
        """A copy whose constant of the term that sets ``assignment``'s predicted peak is raised so that it
        predicts at least the ``measured`` one (never lowered); this model is left as it is. A and H are
        what the blocks do not explain, and that varies along the step (an RNN's stacked outputs and their
        gradient live through its backward), so an assignment unlike the two fitted ones can peak where
        the fitted constants are too low."""
        head, body = self.terms(assignment)
        if self.H + head >= self.A + body:
            return replace(self, H=max(self.H, measured - head))
        return replace(self, A=max(self.A, measured - body))

    def without(self, options: Iterable[Option]) -> ChainCosts:
        """A copy in which ``options`` (never store) are not offered at any block (marked inexact); blocks
        sharing one cost table keep sharing it. This model is left as it is."""
        drop = {o for o in options if not isinstance(o, Store)}
        copies: dict[int, dict[Option, OptionCost]] = {}
        costs = []
        for table in self.costs:
            if id(table) not in copies:
                copies[id(table)] = {
                    o: replace(c, exact=False) if o in drop else c for o, c in table.items()
                }
            costs.append(copies[id(table)])
        return self.with_costs(costs)

    def with_costs(self, costs: list[dict[Option, OptionCost]]) -> ChainCosts:
        """A copy with ``costs`` as its per-block option costs (same constants; the caches derived from the
        costs start empty). This model is left as it is."""
        return replace(self, costs=costs, _segments={}, _entering_bytes={})

    # -- the solver ---------------------------------------------------------------------------------
    def solve(self, budget: float, slots: int | None = None, segments: bool = True) -> Assignment | None:
        """The assignment of least predicted time whose predicted peak is <= budget, or None.

        Each kept block's keep is rounded up to a slot, so a plan keeping in n places can lose up to n slots
        of room: the default is ``max(2000, min(2 * n, 4000))`` slots.
        With ``segments`` the plan may checkpoint runs of blocks as one region (NOTE [ Segments ])."""
        n = len(self.costs)
        slots = max(2000, min(2 * n, 4000)) if slots is None else slots
        room = budget - min(self.A, self.H)
        if room <= 0:
            return None
        unit = max(1.0, room / slots)
        size = slots + 2
        lengths = self.segment_lengths() if segments else []
        cost: dict[int, np.ndarray] = {0: np.full(size, np.inf)}
        cost[0][0] = 0.0
        # choice[j][k]: how the state (j blocks done, keep slot k) was reached: option index + 1 for a
        # single block, -length for a segment ending at block j - 1; 0: unreachable
        choice = np.zeros((n + 1, size), dtype=np.int16)
        recompute_extra = (
            np.concatenate([[0.0], np.cumsum([self.extra_time(m, RECOMPUTE) for m in range(n)])])
            if lengths
            else np.zeros(n + 1)
        )

        def relax(j: int, keep: float, term: float, extra: float, code: int) -> None:
            """Reach block j from the states of ``src`` whose slot k satisfies A + k*unit + term <= budget
            (a prefix of the slots: k*unit bounds the true prefix keep from above)."""
            step = math.ceil(keep / unit)
            top = min(hi, size - step, math.floor((budget - self.A - term) / unit - 1e-9) + 1)
            if top <= lo:
                return
            dst = cost.get(j)
            if dst is None:
                dst = cost[j] = np.full(size, np.inf)
            cand = src[lo:top] + extra
            window = dst[lo + step : top + step]
            better = cand < window
            window[better] = cand[better]
            choice[j][lo + step : top + step][better] = code

        for i in range(n):
            src = cost.pop(i, None)
            if src is None:
                continue
            finite = np.flatnonzero(np.isfinite(src))
            if finite.size == 0:
                continue
            lo, hi = int(finite[0]), int(finite[-1]) + 1
            for oi, o in enumerate(self.options(i)):
                c = self.costs[i][o]
                term = max(c.fwd_peak, c.keep + self.later_grads[i] + c.bwd_peak)
                tie = 0.0 if isinstance(o, Store) else 1e-9
                relax(i + 1, c.keep, term, self.extra_time(i, o) + tie, oi + 1)
            for length in lengths:
                terms = self._segment_terms(i, length)
                if terms is None:
                    continue
                entry, fwd, bwd = terms
                extra = float(recompute_extra[i + length] - recompute_extra[i]) + 2e-9
                relax(i + length, entry, max(fwd, bwd), extra, -length)
        ks = np.arange(size) * unit
        last = cost.get(n)
        if last is None:
            return None
        final = np.where(self.H + ks <= budget, last, np.inf)
        fastest = float(np.min(final))
        if not np.isfinite(fastest):
            return None
        # the DP's last row is the fastest plan per kept amount: the least kept within the tolerance
        within = fastest + self.keep_tolerance * max(self.base_time + fastest, 0.0)
        k = int(np.flatnonzero(final <= within)[0])
        plan: Assignment = []
        j = n
        while j > 0:
            code = int(choice[j][k])
            if code > 0:
                o = self.options(j - 1)[code - 1]
                plan.append(o)
                k -= math.ceil(self.costs[j - 1][o].keep / unit)
                j -= 1
            else:
                length = -code
                plan.extend([IN_SEGMENT] * (length - 1))
                plan.append(Segment(length))
                k -= math.ceil(self._segment_terms(j - length, length)[0] / unit)  # type: ignore[index]
                j -= length
        plan.reverse()
        return plan
