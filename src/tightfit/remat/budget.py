"""The budget forms every planner accepts (``rematerialize``, ``tightfit.plan``, ``tightfit plan --budget``).

    2147483648, 1.5e9, "2GiB", "512MB"   an absolute live-tensor peak of one training step, in bytes
    "min"                                the smallest budget a plan can meet (the most frugal plan's peak)
    "x1.2"                               the least memory predicted within 1.2 times the step time of the
                                         model as it is (no recompute, no conversion)

``parse_budget`` reads a budget into a ``Budget`` before anything is measured, so a malformed one is
refused early; a planner turns it into bytes once it has measured the model (``Budget.resolve``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

from tightfit.errors import InvalidInput, UserError
from tightfit.sizes import ACCEPTED_FORMS, parse_size

__all__ = ["Budget", "parse_budget", "BUDGET_FORMS", "InvalidBudget", "InvalidBudgetType"]

BUDGET_FORMS = (
    f"{ACCEPTED_FORMS}; 'min' for the smallest feasible budget; 'x1.2' for the least memory predicted "
    "within 1.2 times the step time without any technique"
)


class InvalidBudget(UserError, ValueError):
    """A budget that is no accepted form, or not a positive amount (the message names the forms)."""


class InvalidBudgetType(InvalidInput):
    """A budget of a type no form accepts (the message names the forms)."""


@dataclass(frozen=True)
class Budget:
    """A parsed budget: exactly one of ``nbytes`` (a size), ``ratio`` (a step-time ratio, >= 1) or
    ``minimum`` (the smallest feasible)."""

    nbytes: int | None = None
    ratio: float | None = None
    minimum: bool = False

    def resolve(self, min_budget: int, for_overhead: Callable[[float], int]) -> int:
        """Bytes: the size itself, ``min_budget`` for "min", ``for_overhead(ratio)`` for "xR"."""
        if self.nbytes is not None:
            return self.nbytes
        if self.ratio is not None:
            return int(for_overhead(self.ratio))
        return int(min_budget)

    def __str__(self) -> str:
        if self.nbytes is not None:
            return str(self.nbytes)
        return f"x{self.ratio:g}" if self.ratio is not None else "min"


def parse_budget(budget: int | float | str | Budget) -> Budget:
    """A ``Budget`` from any accepted form (see the module docstring; numpy numbers too); ``InvalidBudget``
    (a ValueError) or ``InvalidBudgetType`` (a TypeError) naming the accepted forms otherwise, and for a
    budget of zero bytes or less."""
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
        budget = int(budget)  # numpy integers
    elif isinstance(budget, numbers.Real) and not isinstance(budget, bool):
        budget = float(budget)
    if isinstance(budget, str):
        text = budget.strip().lower()
        if text == "min":
            return Budget(minimum=True)
        if text.startswith("x"):
            try:
                ratio = float(text[1:])
            except ValueError:
                ratio = float("nan")
            if not ratio >= 1.0 or ratio == float("inf"):
                raise InvalidBudget(
                    f"invalid budget {budget!r}: a step-time ratio is 'x' and a finite number >= 1; "
                    f"expected {BUDGET_FORMS}"
                )
            return Budget(ratio=ratio)
    try:
        nbytes = parse_size(budget)
    except ValueError as e:
        raise InvalidBudget(f"{e}; or 'min' (the smallest feasible) or 'x1.2' (a step-time ratio)") from None
    except TypeError:
        raise InvalidBudgetType(
            f"invalid budget {budget!r} of type {type(budget).__name__}: expected {BUDGET_FORMS}"
        ) from None
    if nbytes <= 0:
        raise InvalidBudget(
            f"invalid budget {budget!r}: a training step needs more than 0 bytes; expected {BUDGET_FORMS}"
        )
    return Budget(nbytes=nbytes)
