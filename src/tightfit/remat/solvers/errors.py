"""Errors raised by the rematerialization solvers and the schedule simulator."""

from __future__ import annotations

__all__ = ["InfeasibleBudget", "InvalidSchedule"]


class InfeasibleBudget(Exception):
    """No schedule of the solver's class fits in ``budget``; ``min_budget`` is the smallest one that does.

    ``min_budget`` is computed (a min-peak solve over the same schedule class and memory model), never
    guessed, so retrying with ``budget=err.min_budget`` succeeds.
    """

    def __init__(self, budget: float, min_budget: float, what: str = "schedule") -> None:
        self.budget = float(budget)
        self.min_budget = float(min_budget)
        super().__init__(
            f"no {what} fits in a memory budget of {self.budget:g}; the smallest feasible budget is "
            f"{self.min_budget:g} (same units as the problem's sizes)"
        )


class InvalidSchedule(ValueError):
    """A schedule uses a value that is not in memory (or is otherwise malformed); ``step`` is its index."""

    def __init__(self, step: int, op: object, reason: str) -> None:
        self.step = step
        self.op = op
        self.reason = reason
        super().__init__(f"invalid schedule at step {step} ({op!r}): {reason}")
