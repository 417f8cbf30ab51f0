"""Timing on a shared machine: interleaved rounds, medians, and the paired one-sided sign test.

Every variant runs once per round, in an order that changes from round to round (rotated start, or a
seeded shuffle), so a load that drifts over minutes hits all variants alike. A variant's time is the
median over rounds. Two variants are compared round by round: their ratio in each round (both ran in it,
seconds apart) cancels the drift far better than a ratio of two medians, and the sign test asks whether
one was faster in more rounds than chance allows.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

ORDERS = ("rotate", "shuffle", "fixed")


def wait_for_device() -> None:
    """Block until the accelerator has run all queued work (a no-op on a CPU-only machine)."""
    from tightfit._step import wait_for_device as wait

    wait()


def timed(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of ``fn()``, the accelerator synchronized before and after."""
    wait_for_device()
    t0 = time.perf_counter()
    fn()
    wait_for_device()
    return time.perf_counter() - t0


def interleaved(
    items: Sequence[T],
    run: Callable[[T], R],
    rounds: int,
    *,
    warmup: int = 0,
    order: str = "rotate",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[list[R]]:
    """Run every item once per round for ``rounds`` rounds; returns, per item, what ``run`` returned in
    each round (a time, or a tuple of times).

    ``order``: ``rotate`` starts round r at item r (mod n); ``shuffle`` shuffles the order each round with
    ``random.Random(seed)``; ``fixed`` keeps the given order. ``warmup`` rounds run first, in the given
    order, and are not recorded.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    n = len(items)
    for _ in range(warmup):
        for item in items:
            run(item)
    out: list[list[R]] = [[] for _ in items]
    idx = list(range(n))
    rng = random.Random(seed)
    for r in range(rounds):
        if order == "rotate":
            seq = [(r + i) % n for i in range(n)]
        elif order == "shuffle":
            rng.shuffle(idx)
            seq = list(idx)
        else:
            seq = idx
        for i in seq:
            out[i].append(run(items[i]))
        if log:
            log(f"timing round {r + 1}/{rounds} done")
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """a's time over b's in each round (both ran in the same round)."""
    return [x / y for x, y in zip(a, b)]


def sign_test(faster: int, rounds: int) -> float:
    """One-sided p-value of being faster in at least ``faster`` of ``rounds`` paired rounds by chance."""
    return sum(math.comb(rounds, k) for k in range(faster, rounds + 1)) / 2**rounds


def verdict(ratios: Sequence[float], alpha: float = 0.05) -> str:
    """``win`` when the first variant was faster in enough rounds for the one-sided sign test at
    ``alpha`` (5 rounds: 5 of 5; 9 rounds: 8 of 9), ``LOSS`` when the second was, else a tie."""
    n = len(ratios)
    faster = sum(r < 1 for r in ratios)
    if sign_test(faster, n) <= alpha:
        return "win"
    if sign_test(n - faster, n) <= alpha:
        return "LOSS"
    return "tie (within noise)"


def paired_summary(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> dict[str, Any]:
    """Paired comparison of two variants' round times: ratio median/min/max, rounds a was faster, verdict."""
    ratios = paired_ratios(a, b)
    return {
        "paired_ratio_median": round(statistics.median(ratios), 3),
        "paired_ratio_min": round(min(ratios), 3),
        "paired_ratio_max": round(max(ratios), 3),
        "faster_rounds": sum(r < 1 for r in ratios),
        "rounds": len(ratios),
        "verdict": verdict(ratios, alpha),
    }
