"""The joint forward+backward graph of a :class:`~.problems.Dag`, the object DAG schedules run on.

NOTE (numbering). For a DAG of ``n`` nodes the joint graph has ``2n`` nodes in a topological order:
``0..n-1`` are the forwards ``F_v`` (value: the output of ``v``, ``size[v]`` bytes, cost ``fwd_time[v]``);
``2n-1-v`` is the backward ``G_v`` of node ``v`` (value: the blob of gradients of ``v``'s inputs,
``sum(size[u] for u in deps[v])`` bytes, cost ``bwd_time[v]``). ``G_v`` reads the forward values
``bwd_deps[v]`` and the blobs ``G_w`` of every user ``w`` of ``v`` (their sum is ``v``'s output gradient);
sinks start from an implicit seed of size 0. A schedule computes every joint node at least once; the
memory while a node is computed is everything alive plus its own value.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .problems import Dag

__all__ = ["JointGraph", "joint_graph", "bwd_index"]


@dataclass(frozen=True)
class JointGraph:
    """Single-output nodes in topological order: cost, size, deps, users and printable names."""

    n_fwd: int
    cost: tuple[float, ...]
    size: tuple[float, ...]
    deps: tuple[tuple[int, ...], ...]
    users: tuple[tuple[int, ...], ...]
    names: tuple[str, ...]

    @property
    def n(self) -> int:
        return len(self.cost)


def bwd_index(n: int, v: int) -> int:
    """Joint index of the backward of forward node ``v`` in a DAG of ``n`` nodes."""
    return 2 * n - 1 - v


def joint_graph(dag: Dag) -> JointGraph:
    """Build (and cache per DAG content) the joint graph of ``dag``."""
    return _joint(dag.to_json())


@lru_cache(maxsize=64)
def _joint(key: str) -> JointGraph:
    dag = Dag.from_json(key)
    n = dag.n
    fusers: list[list[int]] = [[] for _ in range(n)]
    for v, d in enumerate(dag.deps):
        for u in d:
            fusers[u].append(v)
    cost = list(dag.fwd_time) + [0.0] * n
    size = list(dag.size) + [0.0] * n
    deps: list[tuple[int, ...]] = [tuple(d) for d in dag.deps] + [()] * n
    names = [dag.names[v] if dag.names else f"F{v}" for v in range(n)] + [""] * n
    for v in range(n):
        j = bwd_index(n, v)
        cost[j] = dag.bwd_time[v]
        size[j] = float(sum(dag.size[u] for u in dag.deps[v]))
        deps[j] = tuple(sorted(set(dag.bwd_deps[v]) | {bwd_index(n, w) for w in fusers[v]}))  # type: ignore[index]
        names[j] = f"G{v}" if not dag.names else f"grad({dag.names[v]})"
    users: list[list[int]] = [[] for _ in range(2 * n)]
    for j, d in enumerate(deps):
        for u in d:
            users[u].append(j)
    return JointGraph(n, tuple(cost), tuple(size), tuple(deps), tuple(tuple(u) for u in users), tuple(names))
