"""Chain solvers: the simulator's memory model, the Rotor DP against brute force, infeasible budgets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tightfit.remat.solvers import (
    Backward,
    Chain,
    Dag,
    ForwardCheckpoint,
    ForwardNoSave,
    ForwardTape,
    Free,
    InfeasibleBudget,
    InvalidSchedule,
    Loss,
    Schedule,
    TapeOption,
    chain_min_memory,
    simulate,
    solve_chain,
    solve_dag_ilp,
    stage_decisions,
    store_all_ops,
    store_all_peak,
)
from tightfit.remat.solvers.brute import brute_chain, brute_chain_min_memory, chain_persistent_schedules

from .test_solvers_strategies import chains


def _two_stage() -> Chain:
    return Chain([1, 2], [3, 4], [10, 20], [5, 7], output_size=1, fwd_overhead=[2, 3], bwd_overhead=[4, 6])


def test_store_all_peak_by_hand() -> None:
    c = _two_stage()
    peak, time = simulate(c, store_all_ops(c))
    # x0=10 | F0 tape: +x1 20 +tape 5 (+ovf 2) -> 35 (37) | F1 tape: +x2 1 +7 (+3) -> 43 (46)
    # Loss: x2 -> d2 (+1 while both live) 44 | B1: +d1 20 (+6) -> 69, then frees x1, tape 7, d2 -> 42
    # B0: +d0 10 (+4) -> 56
    assert peak == 69
    assert time == 1 + 2 + 3 + 4


def test_checkpointed_schedule_by_hand() -> None:
    c = _two_stage()
    ops = [ForwardCheckpoint(0), ForwardTape(1), Loss(), Backward(1),
           ForwardTape(0), Free("x", 1), Backward(0)]
    peak, time = simulate(c, ops)
    # x0 10 | F0 no tape: +x1 20 (+2) -> 30 (32) | F1 tape: +1 +7 (+3) -> 38 (41) | Loss 39 |
    # B1: +d1 20 (+6) -> 64, then 10 + 20 (d1) | F0 tape: +x1 20 +5 (+2) -> 55 (57) | free x1 -> 35
    # B0: +d0 10 (+4) -> 49
    assert peak == 64
    assert time == 1 + 2 + 4 + 1 + 3


@pytest.mark.parametrize("ops, step, words", [
    ([Backward(0)], 0, "d_1"),
    ([ForwardNoSave(1)], 0, "x_1"),
    ([ForwardTape(0), ForwardTape(1), Loss(), Backward(0)], 3, "d_1"),
    ([ForwardNoSave(0), ForwardTape(1), Loss(), Backward(1), ForwardTape(0)], 4, "x_0"),
    ([ForwardTape(0, option=3)], 0, "options"),
    ([ForwardTape(0), ForwardTape(1), Loss(), Backward(1)], 4, "d_0"),
    ([Free("tape", 1)], 0, "not in memory"),
])
def test_simulator_rejects_invalid(ops, step, words) -> None:
    with pytest.raises(InvalidSchedule, match=words) as e:
        simulate(_two_stage(), ops)
    assert e.value.step == step


def test_bad_chain_input_is_named() -> None:
    with pytest.raises(ValueError, match="bwd_time has 1 entries"):
        Chain([1, 2], [1], [1, 1], [1, 1])
    with pytest.raises(ValueError, match=r"tape_size\[1\]"):
        Chain([1, 2], [1, 1], [1, 1], [1, -1])
    with pytest.raises(ValueError, match="slots"):
        solve_chain(_two_stage(), 100, slots=0)


def _check(chain: Chain, s: Schedule, budget: float) -> None:
    peak, time = simulate(chain, s)
    assert peak == pytest.approx(s.peak) and time == pytest.approx(s.time)
    assert peak <= budget + 1e-9


def _budgets(chain: Chain, mm: float) -> list[int]:
    top = int(math.ceil(store_all_peak(chain))) + 1
    return sorted({int(mm) - 1, int(mm), *np.linspace(mm, top, 5).astype(int).tolist(), top})


@settings(max_examples=30, deadline=None, derandomize=True)
@given(chains(max_len=4, max_options=2))
def test_chain_dp_matches_brute_force(chain: Chain) -> None:
    """Integer sizes and one slot per unit: rounding is exact, so the DP must hit the brute-force optimum."""
    mm = brute_chain_min_memory(chain)
    assert chain_min_memory(chain)[0] == mm
    for b in _budgets(chain, mm):
        ref = brute_chain(chain, b)
        if ref is None:
            with pytest.raises(InfeasibleBudget) as e:
                solve_chain(chain, b, slots=max(b, 1))
            assert e.value.min_budget == mm and str(mm).rstrip("0").rstrip(".") in str(e.value)
            continue
        s = solve_chain(chain, b, slots=max(b, 1))
        _check(chain, s, b)
        assert s.time == pytest.approx(ref[0])


def test_chain_dp_matches_brute_force_seven_stages() -> None:
    """L = 7 (8558 persistent schedules enumerated) on a seeded random chain, at two budgets."""
    rng = np.random.default_rng(7)
    L = 7
    c = Chain(rng.integers(1, 5, L), rng.integers(1, 5, L), rng.integers(1, 6, L), rng.integers(0, 6, L),
              output_size=1, fwd_overhead=rng.integers(0, 3, L), bwd_overhead=rng.integers(0, 3, L))
    schedules = [(simulate(c, ops), ops) for ops in chain_persistent_schedules(c)]
    mm = min(p for (p, _), _ in schedules)
    assert chain_min_memory(c)[0] == mm
    for b in (int(mm) + 2, int((mm + store_all_peak(c)) / 2)):
        ref = min(t for (p, t), _ in schedules if p <= b)
        s = solve_chain(c, b, slots=b)
        _check(c, s, b)
        assert s.time == pytest.approx(ref)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(chains(max_len=4, max_options=2), st.floats(0.3, 1.0), st.integers(3, 40))
def test_chain_dp_fractional_budget_never_beats_optimum(chain: Chain, frac: float, slots: int) -> None:
    """Coarse slots round sizes up: still within budget in bytes, never faster than the exact optimum."""
    scale = 1.37  # non-integer sizes
    c = Chain([t for t in chain.fwd_time], chain.bwd_time, [x * scale for x in chain.input_size],
              [x * scale for x in chain.tape_size], output_size=chain.output_size * scale,
              fwd_overhead=[x * scale for x in chain.fwd_overhead],
              bwd_overhead=[x * scale for x in chain.bwd_overhead],
              options=None if chain.options is None else [
                  [TapeOption(o.fwd_time, o.bwd_time, o.tape_size * scale, o.fwd_overhead * scale,
                              o.bwd_overhead * scale) for o in opts] for opts in chain.options])
    mm = chain_min_memory(c)[0]
    b = mm + frac * (store_all_peak(c) - mm) + 1e-9
    ref = brute_chain(c, b)
    s = solve_chain(c, b, slots=slots)
    _check(c, s, b)
    assert s.time >= ref[0] - 1e-9


def test_min_budget_is_feasible_and_tight() -> None:
    rng = np.random.default_rng(3)
    L = 12
    c = Chain(rng.uniform(1, 3, L), rng.uniform(1, 3, L), rng.uniform(1, 9, L), rng.uniform(0, 20, L),
              fwd_overhead=rng.uniform(0, 3, L), bwd_overhead=rng.uniform(0, 3, L))
    with pytest.raises(InfeasibleBudget) as e:
        solve_chain(c, 1.0)
    mb = e.value.min_budget
    assert f"{mb:g}" in str(e.value)
    s = solve_chain(c, mb)
    _check(c, s, mb)
    with pytest.raises(InfeasibleBudget):
        solve_chain(c, mb * (1 - 1e-6))


def test_more_memory_never_slower_and_store_all_at_full_budget() -> None:
    rng = np.random.default_rng(4)
    L = 20
    c = Chain(rng.uniform(1, 3, L), rng.uniform(2, 5, L), rng.uniform(1, 9, L), rng.uniform(1, 20, L))
    full = store_all_peak(c)
    times = [solve_chain(c, full * f, slots=300).time for f in (0.3, 0.5, 0.75, 1.0)]
    assert all(a >= b - 1e-9 for a, b in zip(times, times[1:]))
    assert times[-1] == pytest.approx(sum(c.fwd_time) + sum(c.bwd_time))
    assert times[0] > times[-1]


def test_options_are_used_and_reported() -> None:
    # stage 1 has a cheap-memory option that costs extra backward time (recompute pointwise ops inside)
    opts = [None, [TapeOption(1, 1, 50), TapeOption(1, 1.5, 5)], None]
    c = Chain([1, 1, 1], [1, 1, 1], [4, 4, 4], [4, 50, 4], options=opts)
    full = simulate(c, store_all_ops(c))[0]
    s = solve_chain(c, full - 30, slots=200)
    _check(c, s, full - 30)
    dec = stage_decisions(s, 3)
    assert [d.taped for d in dec] == [True, True, True]
    assert dec[1].option == 1 and dec[0].option == 0
    assert s.time == pytest.approx(6.5)


def test_stage_decisions_of_a_checkpointed_plan() -> None:
    ops = [ForwardCheckpoint(0), ForwardNoSave(1), ForwardTape(2), Loss(), Backward(2),
           ForwardCheckpoint(0), ForwardTape(1), Backward(1), ForwardTape(0), Free("x", 1), Backward(0)]
    c = Chain([1] * 3, [1] * 3, [1] * 3, [1] * 3)
    simulate(c, ops)
    d = stage_decisions(ops)
    assert [(x.taped, x.checkpoint_input, x.forward_runs) for x in d] == [
        (False, True, 3), (False, False, 2), (True, True, 1)]


def test_schedule_json_round_trip() -> None:
    c = _two_stage()
    s = solve_chain(c, 66, slots=66)
    again = Schedule.from_json(s.to_json())
    assert again.ops == s.ops and again.time == s.time and simulate(c, again) == (s.peak, s.time)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(chains(max_len=5), st.floats(0.0, 1.0))
def test_ilp_never_slower_than_chain_dp_on_chains(chain: Chain, frac: float) -> None:
    """Checkmate's staged schedules include Rotor's persistent ones (and may drop/reload the input node).

    Same model when tapes, overheads and the output are zero: then ILP time <= chain DP time.
    """
    c = Chain(chain.fwd_time, chain.bwd_time, [x + 1 for x in chain.input_size], [0.0] * chain.length)
    mm = chain_min_memory(c)[0]
    b = int(mm + frac * (store_all_peak(c) - mm))
    s = solve_chain(c, b, slots=b)
    ilp = solve_dag_ilp(Dag.from_chain(c), b, time_limit=30)
    assert ilp.optimal
    assert simulate(Dag.from_chain(c), ilp)[0] <= b
    assert ilp.time <= s.time + 1e-9
