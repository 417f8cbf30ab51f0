"""The chain DP behind ``rematerialize`` (``tightfit.remat.solvers.chain_costs``) against brute force over
every assignment of small random chains."""

from __future__ import annotations

import itertools
import random

from tightfit.remat.options import IN_SEGMENT, RECOMPUTE, SAVE_MATMUL, STORE, Option, Segment
from tightfit.remat.solvers.chain_costs import ChainCosts, OptionCost, Read

OPTS = (STORE, SAVE_MATMUL, RECOMPUTE)


def _random_chain(rng: random.Random, n: int) -> ChainCosts:
    costs = []
    for _ in range(n):
        keep = rng.randint(50, 100)
        mid = rng.randint(10, keep - 10)
        small = rng.randint(1, 5)
        t = rng.uniform(1, 2)
        costs.append(
            {
                STORE: OptionCost(STORE, keep, keep + rng.randint(0, 20), rng.randint(5, 30), t, 2 * t),
                SAVE_MATMUL: OptionCost(
                    SAVE_MATMUL, mid, keep, rng.randint(20, 60), t, 2 * t + rng.uniform(0.1, 1)
                ),
                RECOMPUTE: OptionCost(RECOMPUTE, small, keep, rng.randint(60, 120), t, 3 * t),
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
    store, frugal = [STORE] * 5, [RECOMPUTE] * 5
    chain.fit(store, 1000, frugal, 700)
    assert chain.peak(frugal) == 700
    head_store, head_frugal = chain.terms(store)[0], chain.terms(frugal)[0]
    # H explains the store run's peak at the head, unless that would put the frugal plan over its measure
    assert chain.H + head_store == 1000 or chain.H + head_frugal == 700


def test_keep_tolerance_takes_the_least_kept_plan_within_it_of_the_fastest() -> None:
    rng = random.Random(2)
    moved = 0
    for _ in range(25):
        n = rng.randint(3, 6)
        chain = _random_chain(rng, n)
        plans = list(itertools.product(OPTS, repeat=n))
        lo, hi = min(chain.peak(p) for p in plans), max(chain.peak(p) for p in plans)
        budget = (lo + hi) // 2
        fastest = chain.solve(budget)
        if fastest is None:
            continue
        chain.keep_tolerance = 0.05
        got = chain.solve(budget)
        chain.keep_tolerance = 0.0
        assert got is not None and chain.peak(got) <= budget
        limit = chain.time(fastest) + 0.05 * chain.time(fastest)  # step time, base included
        assert chain.time(got) <= limit + 1e-9
        kept = chain.terms(got)[0]
        unit = max(1.0, (budget - min(chain.A, chain.H)) / 4000)
        # no plan the DP could have returned (fits with the rounding margin) within the limit keeps less
        rivals = [p for p in plans if chain.peak(p) <= budget - n * unit and chain.time(p) <= limit]
        assert all(chain.terms(p)[0] >= kept - n * unit for p in rivals)
        moved += kept < chain.terms(fastest)[0]
    assert moved >= 5  # the tie-break changed the plan in a good share of the chains


def _flat_chain(n: int, reads: list) -> ChainCosts:
    cost = {
        STORE: OptionCost(STORE, 100, 100, 10, 1.0, 2.0),
        RECOMPUTE: OptionCost(RECOMPUTE, 10, 100, 10, 1.0, 3.0),
    }
    return ChainCosts([dict(cost) for _ in range(n)], [0] * n, base_time=10.0, reads=reads)


def test_a_segment_keeps_what_its_blocks_and_glue_read_from_before_it_unless_read_after_it() -> None:
    # event times: block k at 2k + 1, the glue before block g at 2g (six blocks: 0..12)
    reads: list[list[Read]] = [[] for _ in range(13)]
    reads[5] = [Read(3, 9, 5, 5)]  # block 2 reads tensor 9 made by block 1 (inside the segment)
    reads[7] = [Read(1, 7, 40, 7)]  # block 3 reads tensor 7 from block 0, last read there
    reads[9] = [Read(1, 8, 1000, 11)]  # block 4 reads tensor 8 from block 0, read again by block 5
    reads[11] = [Read(1, 8, 1000, 11)]
    reads[8] = [Read(0, 6, 300, 8), Read(2, 5, 20, 8)]  # glue before block 4: tensors from glue and block 0
    reads[3] = [Read(2, 5, 20, 8)]  # ... but block 1, the segment's first, reads tensor 5: in its keep
    chain = _flat_chain(6, reads)
    plan = [STORE, Segment(4), IN_SEGMENT, IN_SEGMENT, IN_SEGMENT, STORE]
    head, _ = chain.terms(plan)
    assert head == 100 + (10 + 40 + 300) + 100  # 8 lives on for block 5 anyway; 9 is made inside
    assert _flat_chain(6, []).terms(plan)[0] == head - 340
    shorter = [STORE, Segment(2), IN_SEGMENT, STORE, STORE, STORE]
    assert chain.terms(shorter)[0] == _flat_chain(6, []).terms(shorter)[0]  # reads none of them


def test_learned_raises_the_binding_constant_to_the_measured_peak_never_lowers_it_and_copies() -> None:
    rng = random.Random(4)
    chain = _random_chain(rng, 5)
    plan = [RECOMPUTE] * 5
    predicted = chain.peak(plan)
    a, h = chain.A, chain.H
    learned = chain.learned(plan, predicted + 1000)
    assert learned.peak(plan) == predicted + 1000
    assert (learned.A != a) + (learned.H != h) == 1  # only the constant of the binding term moved
    assert (chain.A, chain.H) == (a, h) and chain.peak(plan) == predicted  # the original is untouched
    again = learned.learned(plan, predicted - 500)  # a lower measurement does not lower the model
    assert again.peak(plan) == predicted + 1000


# -- the DP with segments against brute force -----------------------------------------------------
SEGMENT_OPTS = (STORE, RECOMPUTE)


def _random_segment_chain(rng: random.Random, n: int) -> ChainCosts:
    costs = []
    for _ in range(n):
        keep = rng.randint(50, 100)
        t = rng.uniform(1, 2)
        costs.append(
            {
                STORE: OptionCost(STORE, keep, keep + rng.randint(0, 20), rng.randint(5, 30), t, 2 * t),
                RECOMPUTE: OptionCost(RECOMPUTE, rng.randint(5, 30), keep, rng.randint(60, 120), t, 3 * t),
            }
        )
    chain = ChainCosts(costs, sorted((rng.randint(0, 40) for _ in range(n)), reverse=True), base_time=10.0)
    chain.A, chain.H = rng.uniform(0, 50), rng.uniform(0, 80)
    return chain


def _all_plans(n: int) -> list[list[Option]]:
    """Every plan: each block a single option, or blocks grouped into segments."""
    if n == 0:
        return [[]]
    out = [[o, *rest] for o in SEGMENT_OPTS for rest in _all_plans(n - 1)]
    for length in range(2, n + 1):
        out += [
            [Segment(length)] + [IN_SEGMENT] * (length - 1) + rest for rest in _all_plans(n - length)
        ]
    return out


def test_dp_with_segments_is_feasible_and_optimal_up_to_discretisation() -> None:
    rng = random.Random(3)
    used_segments = False
    for _ in range(20):
        n = rng.randint(2, 6)
        chain = _random_segment_chain(rng, n)
        plans = _all_plans(n)
        lo, hi = min(map(chain.peak, plans)), max(map(chain.peak, plans))
        for budget in (lo, (lo + hi) // 2, (3 * lo + hi) // 4, hi):
            slots = 4000
            got = chain.solve(budget, slots=slots)
            unit = max(1.0, (budget - min(chain.A, chain.H)) / slots)
            safe = [p for p in plans if chain.peak(p) <= budget - n * unit]
            if got is None:
                assert not safe
                continue
            assert chain.peak(got) <= budget and len(got) == n
            if safe:
                assert chain.time(got) <= min(chain.time(p) for p in safe) + 1e-6
            used_segments |= any(isinstance(o, Segment) for o in got)
    assert used_segments


def test_without_segments_the_dp_keeps_per_block_options() -> None:
    chain = _random_segment_chain(random.Random(4), 5)
    lo = min(chain.peak(list(p)) for p in itertools.product(SEGMENT_OPTS, repeat=5))
    got = chain.solve(lo, segments=False)
    assert got is not None and set(got) <= set(SEGMENT_OPTS)
