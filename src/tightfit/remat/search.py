"""The verify loop: solve for an internal budget, measure the candidate, correct the model, solve again.

A cost model (``ChainCosts`` here; any object with ``solve``, ``peak``, ``time`` and ``learned``) predicts
peaks only approximately, so a candidate it solves for budget B may measure over B, or well under. The
search keeps an internal budget ``target`` for the solver: lowered by the excess when a candidate measures
over the budget (and the model learns that candidate's measured peak), raised by the slack when it
measures well under, then bisected between the highest target known to fit and the lowest known not to.
It returns the fastest candidate that measured within the budget.

A refused candidate (``Refused``: its gradients differ) makes the model refuse it (``CostModel.refusing``)
and counts as a round; a refused candidate the model proposes again ends the search, so a model whose
refusal changes nothing cannot make it loop.

Everything it learns (corrected models, measured peaks) lives in the ``BudgetSearch`` object of one
query, and is returned in its ``trials``: a planner that searches twice starts twice from the same model.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

Candidate = TypeVar("Candidate", bound=Sequence[Any])


class CostModel(Protocol[Candidate]):
    def solve(self, budget: float) -> Candidate | None: ...

    def peak(self, candidate: Candidate) -> int: ...

    def time(self, candidate: Candidate) -> float: ...

    def learned(self, candidate: Candidate, measured: int) -> CostModel[Candidate]: ...

    def refusing(self, candidate: Candidate, refused: Refused) -> CostModel[Candidate]:
        """A model that no longer proposes candidates like ``candidate`` (which ``measure`` refused with
        ``refused``)."""
        ...


class Refused(Exception):
    """``measure`` found a candidate unusable (its gradients differ, or a block ran other ops than it was
    measured with); the message says why. ``options``: the block options found at fault (a cost model
    refusing the candidate stops offering them), empty when the measurement cannot tell."""

    def __init__(self, message: str, options: Iterable[Any] = ()) -> None:
        super().__init__(message)
        self.options = frozenset(options)


@dataclass
class Trial:
    """One measured candidate: the internal budget it was solved for, its predicted and measured peak."""

    candidate: Sequence[Any]
    target: float
    predicted: int
    measured: int

    def to_dict(self) -> dict[str, Any]:
        return {"target": int(self.target), "predicted": self.predicted, "measured": self.measured}


@dataclass
class Found(Generic[Candidate]):
    """The fastest candidate that measured within the budget (None: none did), and how it was found."""

    candidate: Candidate | None
    target: float | None  # the internal budget it was solved for
    predicted: int | None  # its peak as the model predicted it when the search chose it
    measured: int | None
    rounds: int
    model: CostModel[Candidate]  # the cost model as the search left it (learned from its trials)
    trials: list[Trial] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)


class BudgetSearch(Generic[Candidate]):
    """One query's search. ``measure(candidate)`` returns its measured peak, or raises ``Refused``;
    ``measured`` holds peaks known before the search (keyed by ``tuple(candidate)``), which are not
    measured again; ``verify=False`` trusts the model (no step is run)."""

    def __init__(
        self,
        model: CostModel[Candidate],
        measure: Callable[[Candidate], int],
        measured: dict[Hashable, int],
        *,
        verify: bool = True,
    ) -> None:
        self.model = model
        self._measure = measure
        self.measured = dict(measured)
        self.verify = verify
        self.trials: list[Trial] = []
        self.refusals: list[str] = []
        self.refused: set[Hashable] = set()  # keys of the candidates measure refused

    def peak_of(self, candidate: Candidate, target: float) -> int:
        """The measured peak of ``candidate`` (measured once per search); raises ``Refused``."""
        key = tuple(candidate)
        if not self.verify:
            return 0
        if key not in self.measured:
            try:
                self.measured[key] = self._measure(candidate)
            except Refused as refused:
                self.refused.add(key)
                self.model = self.model.refusing(candidate, refused)
                self.refusals.append(str(refused))
                raise
            self.trials.append(Trial(candidate, target, self.model.peak(candidate), self.measured[key]))
        return self.measured[key]

    def run(self, budget: int, floor: float, max_rounds: int) -> Found[Candidate]:
        """The fastest candidate measuring <= ``budget``; ``floor``: the predicted peak of the most frugal
        candidate (the target is never lowered below it)."""
        target = float(budget)
        fits, over = None, None  # highest target whose candidate measured <= budget, lowest that did not
        best: Candidate | None = None
        best_target: float | None = None
        best_predicted: int | None = None
        rounds = 0
        while rounds < max_rounds:
            rounds += 1
            candidate = self.model.solve(target)
            if candidate is None or tuple(candidate) in self.refused:
                break  # nothing left, or the model proposes a refused candidate again
            try:
                measured = self.peak_of(candidate, target)
            except Refused:
                continue  # the model no longer proposes it; this counts as a round
            if measured <= budget:
                if best is None or self.model.time(candidate) < self.model.time(best):
                    best, best_target, best_predicted = candidate, target, self.model.peak(candidate)
                fits = target
                if over is None:  # nothing measured over yet: when the model over-predicted this candidate
                    slack = budget - measured  # and it left room, ask the solver for the room left
                    overpredicted = self.model.peak(candidate) - measured
                    if not self.verify or min(slack, overpredicted) <= 0.02 * budget:
                        break
                    target += slack
                    continue
                if over - target <= 0.01 * budget:
                    break
                target = (target + over) / 2
            else:
                self.model = self.model.learned(candidate, measured)
                over = target
                lowered = target - (measured - budget + max(1.0, 0.001 * budget))
                target = (fits + target) / 2 if fits is not None else max(lowered, floor)
                if over <= floor:
                    break
        return self._found(best, best_target, best_predicted, rounds)

    def probe(self, budget: int, found: Found[Candidate], margin: float) -> Found[Candidate]:
        """Where the model over-predicted measured candidates, faster ones predicted over the budget may
        measure under it: solve for the budget plus the largest over-prediction seen, and plus half of it,
        and take the first candidate predicted faster than ``found``'s by more than ``margin`` seconds
        that measures <= ``budget``."""
        over = max((self.model.peak(list(k)) - m for k, m in self.measured.items()), default=0)
        if not self.verify or found.candidate is None or over <= 0.02 * budget:
            return found
        limit = self.model.time(found.candidate) - margin
        for target in (budget + over, budget + over / 2):
            candidate = self.model.solve(target)
            if candidate is None or tuple(candidate) in self.refused or self.model.time(candidate) >= limit:
                continue
            try:
                measured = self.peak_of(candidate, target)
            except Refused:
                break
            if measured <= budget:
                return self._found(candidate, target, self.model.peak(candidate), found.rounds)
            self.model = self.model.learned(candidate, measured)
        return self._found(found.candidate, found.target, found.predicted, found.rounds)

    def _found(
        self, candidate: Candidate | None, target: float | None, predicted: int | None, rounds: int
    ) -> Found[Candidate]:
        measured = None if candidate is None or not self.verify else self.measured.get(tuple(candidate))
        return Found(
            candidate, target, predicted, measured, rounds, self.model, list(self.trials), list(self.refusals)
        )
