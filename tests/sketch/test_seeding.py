"""Step clocks: ``tick`` (a loop that never calls the root a clock's hook is on still draws a fresh sketch
per step), and a compiled model ticking its clock and drawing the eager model's sketches step for step."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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


class _Checkpointed(nn.Module):
    """Two sketched layers, the first recomputed in the backward (it must draw its forward's sketch)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = RandomizedLinear(16, 16, k=4), RandomizedLinear(16, 4, k=4)
        self.clock = StepClock()
        for salt, layer in enumerate((self.a, self.b)):
            layer.seeding = LayerSeed(5, salt, self.clock)
        self.register_forward_pre_hook(self.clock)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(checkpoint(lambda t: torch.relu(self.a(t)), x, use_reentrant=False))


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_a_compiled_model_ticks_its_clock_and_draws_the_eager_sketches_step_for_step(backend: str) -> None:
    torch._dynamo.reset()
    x = torch.randn(32, 16)

    def grads(model: _Checkpointed, run: nn.Module) -> list[torch.Tensor]:
        out = []
        for _ in range(3):
            model.zero_grad()
            run(x).square().sum().backward()
            out.append(torch.cat([model.a.weight.grad.flatten(), model.b.weight.grad.flatten()]))
        return out

    torch.manual_seed(0)
    eager = _Checkpointed()
    torch.manual_seed(0)
    model = _Checkpointed()
    expected = grads(eager, eager)
    got = grads(model, torch.compile(model, backend=backend, fullgraph=True))
    assert model.clock.step == eager.clock.step == 3
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert not torch.equal(got[0], got[1]) and not torch.equal(got[1], got[2])  # a fresh sketch each step


def test_a_clock_made_under_inference_mode_ticks_outside_it() -> None:
    with torch.inference_mode():
        clock = StepClock()
    clock()
    assert clock.step == 1
