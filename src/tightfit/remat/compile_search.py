"""The compiler-budget search: the largest activation memory budget of torch.compile's own knapsack whose
compiled step measures within a memory budget, with gradients equal to the model's without remat.

The compiler's budget is a fraction of the activation memory its default partition saves: more is faster
and peaks higher, so the search bisects a grid of ``steps`` points. A grid point whose gradients differ
(the compiler recomputes random ops such as dropout with other random numbers at low budgets) counts as
"save more". Every grid point is compiled and measured once per ``CompileBudgetSearch``: its results
(``grid``, and ``failed`` for points the model does not compile at) are measurements of the model, reused
by every budget asked; a budget's answer depends only on the points its own bisection visits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tightfit.remat.segments import SegmentError


@dataclass
class CompileBudgetSearch:
    """``measure(fraction)`` returns (peak, seconds) of the compiled step at that compiler budget, raising
    ``SegmentError`` when its gradients differ from the model's without remat."""

    measure: Callable[[float], tuple[int, float]]
    steps: int = 40  # the grid k / steps (0.025 apart)
    grid: dict[int, tuple[int, float] | None] = field(default_factory=dict)  # None: wrong gradients
    failed: dict[int, str] = field(default_factory=dict)  # grid points that do not compile: why

    def best(self, budget: int) -> tuple[tuple[float, int, float] | None, str | None]:
        """((compiler budget, peak, seconds) at the largest grid point measuring <= ``budget`` with equal
        gradients, or None), and why the search stopped when the model did not compile at a point it
        visited (then no budget is returned)."""
        lo, hi = 0, self.steps  # hi: the default partition (the no-remat step, over budget)
        best: tuple[int, int, float] | None = None
        while hi - lo > 1:
            k = (lo + hi) // 2
            if k not in self.grid and k not in self.failed:
                try:
                    self.grid[k] = self.measure(k / self.steps)
                except SegmentError:
                    self.grid[k] = None
                except torch._dynamo.exc.BackendCompilerFailed as err:
                    # e.g. Inductor adds a random-seed op to a model with dropout outside the annotated
                    # region, and the partitioner refuses the partial annotation
                    reason = str(err).strip().splitlines()
                    self.failed[k] = reason[-1] if reason else type(err).__name__
            if k in self.failed:
                return None, self.failed[k]
            measured = self.grid[k]
            if measured is None or measured[0] <= budget:
                lo = k
                if measured is not None:
                    best = (k, *measured)
            else:
                hi = k
        if best is None:
            return None, None
        k, peak, seconds = best
        return (k / self.steps, peak, seconds), None
