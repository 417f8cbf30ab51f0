"""DAG solvers: Checkmate ILP (exact and LP rounding) and the lower-set DP against brute force."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tightfit.remat.solvers import (
    Compute,
    Dag,
    InfeasibleBudget,
    InvalidSchedule,
    Release,
    bwd_index,
    joint_graph,
    lower_sets,
    simulate,
    solve_dag_ilp,
    solve_dag_lowerset,
)
from tightfit.remat.solvers.brute import brute_dag_lowerset, brute_dag_staged

from .test_solvers_strategies import dags


def _diamond() -> Dag:
    #   0 -> 1 -> 3
    #   0 -> 2 -> 3 -> 4
    return Dag([1, 2, 2, 1, 1], [1, 3, 3, 2, 1], [4, 6, 6, 3, 1], [[], [0], [0], [1, 2], [3]],
               [[], [0], [0, 2], [1, 2], [3, 4]])


def test_joint_graph_layout() -> None:
    g = joint_graph(_diamond())
    n = 5
    assert g.n == 10 and g.size[:5] == (4, 6, 6, 3, 1)
    # backward of node 3 reads its inputs (1, 2) and the blob of its user 4; its blob = grads of 1 and 2
    assert set(g.deps[bwd_index(n, 3)]) == {1, 2, bwd_index(n, 4)}
    assert g.size[bwd_index(n, 3)] == 12 and g.size[bwd_index(n, 0)] == 0
    assert all(u < j for j in range(g.n) for u in g.deps[j])


def test_dag_simulator_by_hand_and_rejects() -> None:
    d = Dag([1, 1], [1, 1], [2, 3], [[], [0]])
    ops = [Compute(0), Compute(1), Release(1), Compute(bwd_index(2, 1)), Release(0),
           Compute(bwd_index(2, 0)), Release(bwd_index(2, 1))]
    # F0: 2 | F1: 5 | free -> 2 | G1 (blob = grad of x0, 2): 4 | free F0 -> 2 | G0 (blob 0) | free
    assert simulate(d, ops) == (5, 4)
    with pytest.raises(InvalidSchedule, match="needs F0") as e:
        simulate(d, [Compute(1)])
    assert e.value.step == 0
    with pytest.raises(InvalidSchedule, match="never computed: G0"):
        simulate(d, ops[:4])


def test_bad_dag_input_is_named() -> None:
    with pytest.raises(ValueError, match="topologically"):
        Dag([1, 1], [1, 1], [1, 1], [[1], []])
    with pytest.raises(ValueError, match="bwd_deps"):
        Dag([1, 1], [1, 1], [1, 1], [[], [0]], [[], [0, 1, 1], []])


def _budgets(dag: Dag) -> list[float]:
    top = solve_dag_lowerset(dag, 10_000, slots=10_000).peak
    lo = sum(sorted(dag.size)[-2:])
    return sorted({max(1.0, lo - 1), (lo + top) // 2, top - 2, top - 1, top})


@settings(max_examples=15, deadline=None, derandomize=True)
@given(dags(max_nodes=4))
def test_ilp_matches_brute_force_and_rounding_is_no_better(dag: Dag) -> None:
    for b in _budgets(dag):
        ref = brute_dag_staged(dag, b)
        if ref is None:
            with pytest.raises(InfeasibleBudget) as e:
                solve_dag_ilp(dag, b, time_limit=20)
            assert e.value.min_budget > b
            solve_dag_ilp(dag, e.value.min_budget, time_limit=20)  # the named budget works
            continue
        s = solve_dag_ilp(dag, b, time_limit=20)
        assert s.optimal and s.time == pytest.approx(ref) and s.peak <= b
        assert simulate(dag, s) == (s.peak, s.time)
        try:
            a = solve_dag_ilp(dag, b, exact=False)
        except RuntimeError:  # rounding found nothing: allowed, never a wrong answer
            continue
        assert simulate(dag, a)[0] <= b
        assert a.time >= s.time - 1e-9 and a.lower_bound <= s.time + 1e-9


@settings(max_examples=15, deadline=None, derandomize=True)
@given(dags(max_nodes=6))
def test_lowerset_matches_brute_force_and_approx_is_no_better(dag: Dag) -> None:
    for b in _budgets(dag):
        ref = brute_dag_lowerset(dag, b)
        if ref is None:
            with pytest.raises(InfeasibleBudget) as e:
                solve_dag_lowerset(dag, b, slots=max(1, int(b)))
            solve_dag_lowerset(dag, e.value.min_budget)  # the named budget works
            continue
        s = solve_dag_lowerset(dag, b, slots=max(1, int(b)))  # integer sizes, one slot per unit: exact
        assert s.info["exact_family"] and s.time == pytest.approx(ref) and s.peak <= b
        assert simulate(dag, s) == (s.peak, s.time)
        try:
            a = solve_dag_lowerset(dag, b, exact=False, slots=max(1, int(b)))
        except InfeasibleBudget:
            continue
        assert simulate(dag, a)[0] <= b and a.time >= s.time - 1e-9


@settings(max_examples=10, deadline=None, derandomize=True)
@given(dags(min_nodes=6, max_nodes=8), st.floats(0.0, 1.0))
def test_all_dag_solvers_valid_on_eight_nodes(dag: Dag, frac: float) -> None:
    top = solve_dag_lowerset(dag, 10_000, slots=10_000).peak
    try:
        solve_dag_lowerset(dag, 0.0)
    except InfeasibleBudget as e:
        lo = e.min_budget
    b = lo + frac * (top - lo)
    ls = solve_dag_lowerset(dag, b, slots=100)
    assert simulate(dag, ls)[0] <= b + 1e-9
    try:
        il = solve_dag_ilp(dag, b, time_limit=5)
    except InfeasibleBudget as e:  # Checkmate's class has its own smallest budget
        assert e.min_budget > b
        return
    assert simulate(dag, il)[0] <= b + 1e-9
    if il.optimal:
        assert il.lower_bound is not None and il.lower_bound <= il.time + 1e-9


def test_lower_sets_of_diamond() -> None:
    sets = lower_sets(_diamond())
    # {}, {0}, {0,1}, {0,2}, {0,1,2}, {0,1,2,3}, all
    assert len(sets) == 7 and sets[0] == 0 and sets[-1] == 0b11111
    assert lower_sets(_diamond(), limit=3) is None


def test_rematerialization_pays_off_on_a_long_dag() -> None:
    n = 14
    deps = [[]] + [[v - 1] + ([v - 3] if v >= 3 and v % 3 == 0 else []) for v in range(1, n)]
    dag = Dag([1] * n, [2] * n, [4] * n, deps)
    full = solve_dag_lowerset(dag, 10_000, slots=1000)
    s = solve_dag_lowerset(dag, 0.6 * full.peak, exact=False, slots=100)
    assert s.peak <= 0.6 * full.peak and full.time < s.time < 2 * full.time
