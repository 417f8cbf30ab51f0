"""The budget forms every planner accepts (tightfit.remat.budget), read before anything is measured."""

from __future__ import annotations

import pytest
import torch

from tightfit.remat.budget import Budget, parse_budget
from tightfit.remat.measure import accelerator_key


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", Budget(nbytes=2 * 2**30)),
        (1.5e9, Budget(nbytes=1_500_000_000)),
        (4096, Budget(nbytes=4096)),
        ("min", Budget(minimum=True)),
        (" MIN ", Budget(minimum=True)),
        ("x1.2", Budget(ratio=1.2)),
        ("X1", Budget(ratio=1.0)),
    ],
)
def test_every_form_parses(text, expected) -> None:
    assert parse_budget(text) == expected
    assert parse_budget(expected) is expected


@pytest.mark.parametrize("bad", ["x0.9", "x", "xinf", "2 gigs", "-1", "fast"])
def test_bad_forms_name_every_accepted_one(bad) -> None:
    with pytest.raises(ValueError) as info:
        parse_budget(bad)
    assert "min" in str(info.value) and "x1.2" in str(info.value)
    with pytest.raises(TypeError, match="x1.2"):
        parse_budget([1])  # type: ignore[arg-type]


def test_resolve_asks_the_planner_only_for_what_it_needs() -> None:
    asked: list[float] = []

    def for_overhead(ratio: float) -> int:
        asked.append(ratio)
        return 777

    assert Budget(nbytes=5).resolve(100, for_overhead) == 5
    assert Budget(minimum=True).resolve(100, for_overhead) == 100
    assert Budget(ratio=1.3).resolve(100, for_overhead) == 777 and asked == [1.3]
    assert str(Budget(ratio=1.3)) == "x1.3" and str(Budget(minimum=True)) == "min"


def test_budgets_count_all_memory_on_the_cpu() -> None:
    assert accelerator_key([torch.ones(2), {"x": torch.ones(3)}]) is None
    assert accelerator_key([torch.empty(2, device="meta")]) is None
