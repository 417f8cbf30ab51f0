"""``tick``: a loop that never calls the root a sketch clock's hook is on still draws a fresh sketch per
step."""

from __future__ import annotations

import torch
from torch import nn

from tightfit.sketch import LayerSeed, RandomizedLinear, StepClock
from tightfit.sketch.seeding import tick


def _net(clock: StepClock, other: StepClock) -> nn.Module:
    layers = [RandomizedLinear(8, 8, ratio=0.5) for _ in range(3)]
    for salt, layer in enumerate(layers[:2]):
        layer.seeding = LayerSeed(11, salt, clock)  # two layers share one clock
    layers[2].seeding = LayerSeed(12, 0, other)
    return nn.Sequential(*layers, nn.Linear(8, 8))  # a plain layer: no clock


def test_tick_advances_each_clock_once_and_changes_the_seeds() -> None:
    clock, other = StepClock(), StepClock()
    net = _net(clock, other)
    seeds = [m.seeding.draw() for m in net if isinstance(m, RandomizedLinear)]
    assert tick(net) == 2
    assert (clock.step, other.step) == (1, 1)
    fresh = [m.seeding.draw() for m in net if isinstance(m, RandomizedLinear)]
    assert all(a != b for a, b in zip(seeds, fresh))
    assert tick(nn.Linear(2, 2)) == 0


def test_a_ticked_step_draws_another_sketch_with_the_same_global_rng() -> None:
    clock, other = StepClock(), StepClock()
    net = _net(clock, other)
    x = torch.randn(5, 8)

    def grads() -> torch.Tensor:
        net.zero_grad()
        torch.manual_seed(0)
        net(x).square().sum().backward()
        return net[0].weight.grad.clone()

    first, again = grads(), grads()
    assert torch.equal(first, again)  # no tick: the same sketch
    tick(net)
    assert not torch.equal(first, grads())
