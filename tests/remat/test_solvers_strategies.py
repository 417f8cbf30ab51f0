"""Hypothesis strategies shared by the solver tests: small random chains and DAGs with integer sizes."""

from __future__ import annotations

from hypothesis import strategies as st

from tightfit.remat.solvers import Chain, Dag, TapeOption

small = st.integers(0, 5)
pos = st.integers(1, 5)


@st.composite
def chains(draw, max_len: int = 5, max_options: int = 1, min_len: int = 1) -> Chain:
    L = draw(st.integers(min_len, max_len))
    k = draw(st.integers(1, max_options))
    options = None
    if k > 1:
        ovh = st.integers(0, 2)
        options = [[TapeOption(draw(pos), draw(pos), draw(small), draw(ovh), draw(ovh)) for _ in range(k)]
                   for _ in range(L)]
    return Chain([draw(pos) for _ in range(L)], [draw(pos) for _ in range(L)],
                 [draw(small) for _ in range(L)], [draw(small) for _ in range(L)],
                 output_size=draw(st.integers(0, 2)),
                 fwd_overhead=[draw(st.integers(0, 2)) for _ in range(L)],
                 bwd_overhead=[draw(st.integers(0, 2)) for _ in range(L)], options=options)


@st.composite
def dags(draw, max_nodes: int = 4, min_nodes: int = 1) -> Dag:
    n = draw(st.integers(min_nodes, max_nodes))
    deps = []
    bdeps = []
    for v in range(n):
        d = sorted(draw(st.sets(st.integers(0, v - 1), max_size=2))) if v > 0 else []
        if v > 0 and not d and draw(st.booleans()):
            d = [v - 1]
        deps.append(d)
        extra = [v] if draw(st.booleans()) else []
        chosen = draw(st.sets(st.sampled_from(d), max_size=len(d))) if d else set()
        bdeps.append(sorted(set(chosen) | set(extra)))
    return Dag([draw(pos) for _ in range(n)], [draw(pos) for _ in range(n)], [draw(pos) for _ in range(n)],
               deps, bdeps)


# The strategies double as a JSON round-trip check of the problem types.
from hypothesis import given, settings  # noqa: E402


@settings(max_examples=25, deadline=None, derandomize=True)
@given(chains(max_len=4, max_options=2))
def test_chain_json_round_trip(chain: Chain) -> None:
    again = Chain.from_json(chain.to_json())
    assert again.to_dict() == chain.to_dict()
    assert [again.stage_options(i) for i in range(again.length)] == [
        chain.stage_options(i) for i in range(chain.length)]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(dags(max_nodes=6))
def test_dag_json_round_trip(dag: Dag) -> None:
    again = Dag.from_json(dag.to_json())
    assert again.to_dict() == dag.to_dict()
