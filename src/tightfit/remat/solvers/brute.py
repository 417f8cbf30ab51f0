"""Brute-force references for tests: enumerate schedules explicitly and score each with the simulator.

These share no recurrence or memory arithmetic with the solvers: every candidate's time and peak come
from :func:`.simulate.simulate`. Exponential; for tiny problems only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from .problems import (
    Backward,
    Chain,
    ForwardCheckpoint,
    ForwardNoSave,
    ForwardTape,
    Free,
    Loss,
    Op,
)
from .simulate import simulate_chain

__all__ = ["chain_persistent_schedules", "brute_chain"]


def chain_persistent_schedules(chain: Chain) -> Iterator[list[Op]]:
    """Every persistent schedule of ``chain`` (Rotor's class), as explicit op lists.

    Persistent: to backprop stages ``s..t`` from ``x_s``, either tape ``s`` (any option) and recurse on
    ``s+1..t``, or keep ``x_s`` and run without tape to some later ``x_{s'}``, recurse on ``s'..t`` then
    ``s..s'-1``. Stage ``L`` is the loss.
    """
    L = chain.length
    n_opt = [len(chain.stage_options(i)) for i in range(L)]

    def gen(s: int, t: int) -> Iterator[list[Op]]:
        if s == L:
            yield [Loss()]
            return
        for o in range(n_opt[s]):
            if s == t:
                yield [ForwardTape(s, o), Free("x", s + 1), Backward(s)]
            else:
                for rest in gen(s + 1, t):
                    yield [ForwardTape(s, o), *rest, Backward(s)]
        for sp in range(s + 1, t + 1):
            head: list[Op] = [ForwardCheckpoint(s)] + [ForwardNoSave(k) for k in range(s + 1, sp)]
            right = list(gen(sp, t))
            for a, b in itertools.product(right, gen(s, sp - 1)):
                yield head + a + b

    yield from gen(0, L)


def brute_chain(chain: Chain, budget: float) -> tuple[float, float, list[Op]] | None:
    """``(time, peak, ops)`` of the fastest persistent schedule with simulated peak ``<= budget``, or None."""
    best = None
    for ops in chain_persistent_schedules(chain):
        peak, time = simulate_chain(chain, ops)
        if peak <= budget and (best is None or time < best[0] or (time == best[0] and peak < best[1])):
            best = (time, peak, ops)
    return best


def brute_chain_min_memory(chain: Chain) -> float:
    """Smallest simulated peak over all persistent schedules."""
    return min(simulate_chain(chain, ops)[0] for ops in chain_persistent_schedules(chain))
