"""The per-block chain model and its DP against brute force over every plan of small random chains."""

from __future__ import annotations

import itertools
import random

from tightfit.remat.chainmodel import ChainCosts
from tightfit.remat.measure import OptionCost

OPTS = ("store", "save-matmul", "recompute")


def _random_chain(rng: random.Random, n: int) -> ChainCosts:
    costs = []
    for _ in range(n):
        keep = rng.randint(50, 100)
        mid = rng.randint(10, keep - 10)
        small = rng.randint(1, 5)
        t = rng.uniform(1, 2)
        costs.append(
            {
                "store": OptionCost("store", keep, keep + rng.randint(0, 20), rng.randint(5, 30), t, 2 * t),
                "save-matmul": OptionCost(
                    "save-matmul", mid, keep, rng.randint(20, 60), t, 2 * t + rng.uniform(0.1, 1)
                ),
                "recompute": OptionCost("recompute", small, keep, rng.randint(60, 120), t, 3 * t),
            }
        )
    later = sorted((rng.randint(0, 40) for _ in range(n)), reverse=True)
    chain = ChainCosts(costs, later, base_time=10.0)
    chain.A, chain.H = rng.uniform(0, 50), rng.uniform(0, 80)
    return chain


def test_dp_is_feasible_and_optimal_up_to_discretisation() -> None:
    rng = random.Random(0)
    for _ in range(25):
        n = rng.randint(2, 6)
        chain = _random_chain(rng, n)
        plans = list(itertools.product(OPTS, repeat=n))
        lo = min(chain.peak(p) for p in plans)
        hi = max(chain.peak(p) for p in plans)
        for budget in (lo, (lo + hi) // 2, hi, lo - 1):  # bytes: integers, like peak()
            slots = 4000
            got = chain.solve(budget, slots=slots)
            if got is None:
                unit = max(1.0, (budget - min(chain.A, chain.H)) / slots)
                # nothing fits, or only plans within the rounding margin of the budget
                assert all(chain.peak(p) > budget - n * unit for p in plans)
                continue
            assert chain.peak(got) <= budget
            unit = max(1.0, (budget - min(chain.A, chain.H)) / slots)
            safe = [p for p in plans if chain.peak(p) <= budget - n * unit]
            if safe:
                assert chain.time(got) <= min(chain.time(p) for p in safe) + 1e-6


def test_fit_reproduces_the_two_measured_peaks() -> None:
    rng = random.Random(1)
    chain = _random_chain(rng, 5)
    store, frugal = ["store"] * 5, ["recompute"] * 5
    chain.fit(store, 1000, frugal, 700)
    assert chain.peak(frugal) == 700
    head_store, head_frugal = chain.terms(store)[0], chain.terms(frugal)[0]
    # H explains the store run's peak at the head, unless that would put the frugal plan over its measure
    assert chain.H + head_store == 1000 or chain.H + head_frugal == 700
