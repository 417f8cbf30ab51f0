"""The pure functions of benchmarks/planner/fewbit_bound.py against brute force on random small instances, and
one dry run of the script on a tiny model (the bound is a measured argument: its arithmetic must be exact)."""

import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.planner.fewbit_bound import (
    allocate,
    best_at,
    envelope_at,
    jensen_bound,
    knapsack_frontier,
    lower_envelope,
    time_for,
)

REPO = Path(__file__).resolve().parents[2]


def _items(rng: random.Random, n: int) -> list[tuple[float, float]]:
    # never zeros: bytes 1..64 (integers, so sums compare exactly), seconds in (0.1, 5)
    return [(float(rng.randint(1, 64)), rng.uniform(0.1, 5.0)) for _ in range(n)]


def _points(rng: random.Random, n: int) -> list[tuple[float, float]]:
    return [(rng.uniform(-3.0, 10.0), rng.uniform(1.0, 100.0)) for _ in range(n)]


def _brute_envelope(points: list[tuple[float, float]], t: float) -> float:
    """min over one point or two points mixed of bytes, at mixed seconds <= t (non-increasing convex hull)."""
    best = min((b for s, b in points if s <= t), default=math.inf)
    for (t1, b1), (t2, b2) in itertools.combinations(points, 2):
        if t1 > t2:
            (t1, b1), (t2, b2) = (t2, b2), (t1, b1)
        if t1 <= t <= t2 and t2 > t1:
            best = min(best, b1 + (b2 - b1) * (t - t1) / (t2 - t1))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_frontier_is_the_exact_pareto_set(seed):
    rng = random.Random(seed)
    items = _items(rng, rng.randint(1, 9))
    fixed = float(rng.randint(1, 10))
    front = knapsack_frontier(items, fixed)
    total = sum(s for _, s in items)
    every = []
    for mask in itertools.product((0, 1), repeat=len(items)):
        kept = fixed + sum(b for (b, _), k in zip(items, mask) if k)
        recomputed = total - sum(s for (_, s), k in zip(items, mask) if k)
        every.append((recomputed, kept))
    # every subset is dominated by (or equal to) a frontier point
    for t, b in every:
        assert any(ft <= t + 1e-9 and fb <= b for ft, fb in front), (t, b)
    # every frontier point is some subset, and none dominates another
    for ft, fb in front:
        assert any(abs(ft - t) < 1e-9 and fb == b for t, b in every)
    for (t1, b1), (t2, b2) in zip(front, front[1:]):
        assert t1 < t2 and b1 > b2
    # the extremes: keep everything (no recompute), keep nothing (fixed bytes only)
    assert front[0] == (pytest.approx(0.0, abs=1e-9), fixed + sum(b for b, _ in items))
    assert front[-1] == (pytest.approx(total), fixed)


def test_knapsack_frontier_rejects_bad_items():
    with pytest.raises(ValueError, match="non-negative"):
        knapsack_frontier([(1.0, -2.0)])


@pytest.mark.parametrize("seed", range(6))
def test_lower_envelope_matches_brute_force(seed):
    rng = random.Random(100 + seed)
    points = _points(rng, rng.randint(1, 8))
    hull = lower_envelope(points)
    lo = min(t for t, _ in points)
    for t in [lo - 1.0, *(rng.uniform(lo, 12.0) for _ in range(40)), *(p[0] for p in points), 50.0]:
        want = _brute_envelope(points, t)
        got = envelope_at(hull, t)
        if math.isinf(want):
            assert math.isinf(got)
        else:
            assert got == pytest.approx(want, rel=1e-9, abs=1e-9), t
    # convex and non-increasing
    for (t1, b1), (t2, b2) in zip(hull, hull[1:]):
        assert t1 < t2 and b1 > b2
    slopes = [(b2 - b1) / (t2 - t1) for (t1, b1), (t2, b2) in zip(hull, hull[1:])]
    assert all(s1 <= s2 + 1e-12 for s1, s2 in zip(slopes, slopes[1:]))


@pytest.mark.parametrize("seed", range(4))
def test_jensen_and_allocate_bound_every_discrete_plan(seed):
    rng = random.Random(200 + seed)
    points = _points(rng, 5)
    hull = lower_envelope(points)
    blocks = rng.randint(2, 3)
    outside = rng.uniform(1.0, 50.0)
    for total in (rng.uniform(-5.0, 25.0) for _ in range(8)):
        bound = jensen_bound(hull, blocks, total, outside)
        assert allocate([hull] * blocks, total) + outside == pytest.approx(bound, rel=1e-9)
        plans = [
            sum(b for _, b in combo)
            for combo in itertools.product(points, repeat=blocks)
            if sum(t for t, _ in combo) <= total
        ]
        best = min(plans, default=math.inf) + outside
        assert best >= bound - 1e-9  # no plan of measured points beats the bound
    # tight where every block can sit on one vertex
    t, b = hull[len(hull) // 2]
    assert jensen_bound(hull, blocks, blocks * t, outside) == pytest.approx(blocks * b + outside)


@pytest.mark.parametrize("seed", range(4))
def test_allocate_matches_brute_force_for_different_blocks(seed):
    rng = random.Random(300 + seed)
    hulls = [lower_envelope(_points(rng, 4)) for _ in range(2)]
    for total in (rng.uniform(-4.0, 20.0) for _ in range(6)):
        got = allocate(hulls, total)
        # brute force over a fine grid of splits (the optimum of a piecewise-linear convex sum is on a vertex
        # of one block: try every vertex time for block 0 and the rest for block 1, and vice versa)
        want = math.inf
        for i, j in ((0, 1), (1, 0)):
            for t, _ in hulls[i]:
                want = min(want, envelope_at(hulls[i], t) + envelope_at(hulls[j], total - t))
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9) or (math.isinf(got) and math.isinf(want))


@pytest.mark.parametrize("seed", range(4))
def test_time_for_inverts_allocate(seed):
    rng = random.Random(400 + seed)
    hulls = [lower_envelope(_points(rng, 5)) for _ in range(rng.randint(1, 3))]
    slowest = allocate(hulls, 1e5)
    lo_t = sum(h[0][0] for h in hulls)
    assert time_for(hulls, slowest - 1.0) == math.inf  # below every block's least bytes: never
    assert time_for(hulls, allocate(hulls, lo_t) + 1.0) == lo_t  # reached at the fastest points
    for target in (rng.uniform(slowest, allocate(hulls, lo_t)) for _ in range(5)):
        t = time_for(hulls, target)
        assert allocate(hulls, t) <= target + 1e-6
        assert allocate(hulls, t - 1e-4) > target - 1e-6 or t == lo_t  # and not reached earlier


def test_best_at():
    rows = [(1.2, 300.0), (1.05, 500.0), (0.99, 700.0)]
    assert best_at(rows, 1.0) == 700.0
    assert best_at(rows, 1.1) == 500.0
    assert best_at(rows, 0.9) is None


def test_dry_run(tmp_path):
    env = dict(os.environ, TIGHTFIT_BENCH_RESULTS=str(tmp_path), PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.planner.fewbit_bound",
        "--layers",
        "2",
        "--batch",
        "2",
        "--seq",
        "64",
        "--threads",
        "1",
        "--repeats",
        "2",
        "--results",
        "fewbit_bound_dry",
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rec = json.loads((tmp_path / "latest" / "fewbit_bound_dry.json").read_text())
    assert (tmp_path / "latest" / "fewbit_bound_dry.txt").exists()
    bounds = rec["bounds"]
    assert [b["ratio"] for b in bounds] == sorted(b["ratio"] for b in bounds)
    mib = [b["bound_mib"] for b in bounds]
    assert all(m > 0 for m in mib) and all(a >= b - 1e-9 for a, b in zip(mib, mib[1:]))  # more time, less
    assert all(b["hypothetical_packed_mask_mib"] <= b["bound_mib"] + 1e-9 for b in bounds)
    # the bound at x1.00 cannot exceed the unmodified step's measured peak above parameters
    base = (rec["settings"]["baseline_peak_bytes"] - rec["settings"]["params_bytes"]) / 2**20
    assert mib[0] <= base + 1e-6
    assert rec["outside"]["plans"] and all(b["planner_best_mib"] is None for b in bounds)
    # two independent measurements; the summary keeps, per ratio, the least of their bounds
    assert len(rec["repeats"]) == 2 == rec["settings"]["repeats"]
    for i, b in enumerate(bounds):
        per = [r["bounds"][i]["bound_mib"] for r in rec["repeats"]]
        assert b["bound_mib_by_repeat"] == per and b["bound_mib"] == min(per)
    assert rec["outside"]["bytes"] == min(r["outside"]["bytes"] for r in rec["repeats"])
