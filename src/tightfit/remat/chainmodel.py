"""Predict a per-block plan's peak and step time from measured block costs, and find the fastest plan.

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
  constant of ``tightfit.remat.auto``). The model is approximate (the output of a block is counted as
  kept until its own backward; in-place gradient accumulation is not modelled), so plans are verified
  by measuring them, and the internal budget is lowered when a plan measures over the budget.

NOTE [ The solver ]
  Constraints only depend on the prefix sum K_i, so a dynamic program over blocks with K discretised in
  ``slots`` units (rounded up, so a plan the DP accepts satisfies the model) finds the plan of least
  predicted time exactly: O(L * options * slots).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tightfit.remat.measure import OptionCost


@dataclass
class ChainCosts:
    """Per-block option costs (``costs[i][option]``), per-block later-gradient bytes and the constants."""

    costs: list[dict[str, OptionCost]]
    later_grads: list[int]  # G_i
    base_time: float  # measured step time without remat
    A: float = 0.0
    H: float = 0.0

    def options(self, i: int) -> list[str]:
        return [o for o, c in self.costs[i].items() if c.exact]

    def extra_time(self, i: int, option: str) -> float:
        c, s = self.costs[i][option], self.costs[i]["store"]
        return max(0.0, c.fwd_time + c.bwd_time - s.fwd_time - s.bwd_time)

    # -- the model ----------------------------------------------------------------------------------
    def terms(self, plan: Sequence[str]) -> tuple[int, int]:
        """(head term K_L, body term max over forward/backward events) without the constants."""
        k = 0
        body = 0
        for i, o in enumerate(plan):
            c = self.costs[i][o]
            body = max(body, k + c.fwd_peak, k + c.keep + self.later_grads[i] + c.bwd_peak)
            k += c.keep
        return k, body

    def peak(self, plan: Sequence[str]) -> int:
        head, body = self.terms(plan)
        return int(math.ceil(max(self.H + head, self.A + body)))

    def time(self, plan: Sequence[str]) -> float:
        return self.base_time + sum(self.extra_time(i, o) for i, o in enumerate(plan))

    def fit(
        self, store_plan: Sequence[str], store_peak: int, frugal_plan: Sequence[str], frugal_peak: int
    ) -> None:
        """Set A and H from the measured peaks of two plans (see the NOTE)."""
        head_s, _ = self.terms(store_plan)
        head_f, body_f = self.terms(frugal_plan)
        self.H = store_peak - head_s
        self.A = frugal_peak - body_f
        if self.H + head_f > frugal_peak:
            self.H = frugal_peak - head_f

    # -- the solver ---------------------------------------------------------------------------------
    def solve(self, budget: float, slots: int | None = None) -> list[str] | None:
        """The plan of least predicted time whose predicted peak is <= budget, or None.

        Each block's keep is rounded up to a slot, so a chain of n blocks can lose up to n slots of room:
        the default is ``max(2000, 4 * n)`` slots (long RNN chains would otherwise find no plan at all)."""
        n = len(self.costs)
        slots = max(2000, 4 * n) if slots is None else slots
        room = budget - min(self.A, self.H)
        if room <= 0:
            return None
        unit = max(1.0, room / slots)
        size = slots + 2
        inf = np.inf
        cost = np.full(size, inf)
        cost[0] = 0.0
        ks = np.arange(size) * unit  # an upper bound on the true prefix keep of each state
        choices: list[np.ndarray] = []
        for i in range(n):
            new = np.full(size, inf)
            pick = np.full(size, -1, dtype=np.int64)
            names = self.options(i)
            for oi, o in enumerate(names):
                c = self.costs[i][o]
                step = int(math.ceil(c.keep / unit))
                ok = (self.A + ks + c.fwd_peak <= budget) & (
                    self.A + ks + c.keep + self.later_grads[i] + c.bwd_peak <= budget
                )
                cand = np.where(ok, cost, inf) + self.extra_time(i, o) + (0.0 if o == "store" else 1e-9)
                if step >= size:
                    continue
                src = cand[: size - step]
                dst = new[step:]
                better = src < dst
                dst[better] = src[better]
                pick[step:][better] = oi
            cost = new
            choices.append(pick)
        final = np.where(self.H + ks <= budget, cost, inf)
        k = int(np.argmin(final))
        if not np.isfinite(final[k]):
            return None
        plan: list[str] = []
        for i in range(n - 1, -1, -1):
            o = self.options(i)[int(choices[i][k])]
            plan.append(o)
            k -= int(math.ceil(self.costs[i][o].keep / unit))
        plan.reverse()
        return plan
