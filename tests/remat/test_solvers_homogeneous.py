"""Homogeneous chains: Revolve (closed form, schedules) and BPTT (Gruslys et al.) against the chain DP."""

from __future__ import annotations

from functools import cache

import pytest

from tightfit.remat.solvers import (
    Chain,
    InfeasibleBudget,
    beta,
    revolve,
    revolve_extra_forwards,
    simulate,
    solve_bptt,
    solve_chain,
    store_all_peak,
)


@cache
def _extra_by_recurrence(n: int, s: int) -> float:
    """Independent reference: extra forwards = min over the first checkpoint position (no closed form)."""
    if n == 1:
        return 0
    if s == 0:
        return float("inf")
    return min(j + _extra_by_recurrence(n - j, s - 1) + _extra_by_recurrence(j, s) for j in range(1, n))


def test_beta_and_closed_form() -> None:
    assert beta(3, 2) == 10 and beta(1, 4) == 5
    for n in range(1, 30):
        for s in range(1, 6):
            assert revolve_extra_forwards(n, s) == _extra_by_recurrence(n, s)
    # the binomial bound: beta(s, r) steps reversible with r recomputations each at most
    assert revolve_extra_forwards(beta(3, 2), 3) <= 2 * beta(3, 2)


@pytest.mark.parametrize("n", [1, 2, 5, 13])
@pytest.mark.parametrize("s", [1, 2, 4])
def test_revolve_matches_chain_dp_under_its_assumption(n: int, s: int) -> None:
    """Revolve records a step only right before reversing it: in the chain model, a tape larger than all
    checkpoints together. There the chain DP at the Revolve schedule's peak finds the same time."""
    r = revolve(n, s)
    assert r.info["extra_forwards"] == revolve_extra_forwards(n, s)
    chain = Chain.homogeneous(n, 1.0, 1.0, 1.0, tape_size=100.0)
    peak, time = simulate(chain, r)
    assert time == 2 * n + revolve_extra_forwards(n, s)
    d = solve_chain(chain, peak, slots=int(peak))
    assert d.time == pytest.approx(time)


def test_chain_dp_beats_revolve_when_tapes_are_cheap() -> None:
    chain = Chain.homogeneous(10, 1.0, 1.0, 1.0, tape_size=0.0)
    r = revolve(10, 2)
    peak, time = simulate(chain, r)
    assert solve_chain(chain, peak, slots=int(peak)).time < time


@pytest.mark.parametrize("tau", [0, 1, 3])
@pytest.mark.parametrize("n", [1, 4, 9])
def test_bptt_equals_chain_dp(n: int, tau: int) -> None:
    chain = Chain.homogeneous(n, 1.0, 2.0, 1.0, tape_size=tau)
    top = int(store_all_peak(chain)) + 1
    for b in range(2, top + 1):
        try:
            ref = solve_chain(chain, b, slots=b)
        except InfeasibleBudget as e:
            with pytest.raises(InfeasibleBudget) as e2:
                solve_bptt(n, b, 1.0, 2.0, 1.0, tau)
            assert e2.value.min_budget == e.min_budget
            continue
        g = solve_bptt(n, b, 1.0, 2.0, 1.0, tau)
        peak, time = simulate(chain, g)
        assert peak <= b and time == pytest.approx(g.time)
        assert g.time == pytest.approx(ref.time)


def test_bptt_hidden_states_only_is_revolve() -> None:
    n = 12
    chain = Chain.homogeneous(n, 1.0, 1.0, 1.0, tape_size=100.0)
    for s in (1, 2, 3):
        peak, time = simulate(chain, revolve(n, s))
        g = solve_bptt(n, peak, 1.0, 1.0, 1.0, 100.0, store_hidden_only=True)
        assert g.time == pytest.approx(time)


def test_bptt_long_sequence_is_valid() -> None:
    n = 200
    chain = Chain.homogeneous(n, 1.0, 2.0, 1.0, tape_size=4.0)
    b = 0.1 * store_all_peak(chain)
    g = solve_bptt(n, b, 1.0, 2.0, 1.0, 4.0)
    peak, time = simulate(chain, g)
    assert peak <= b and time == pytest.approx(g.time)
    assert 3 * n < time < 3 * n * 2  # recomputes, but far less than a quadratic schedule


def test_revolve_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="n_steps"):
        revolve(0, 3)
    with pytest.raises(InfeasibleBudget):
        revolve(5, 0)
