"""Block measurements: what a block keeps is counted exactly, its parameters excluded."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from tightfit.remat.blocks import find_blocks
from tightfit.remat.measure import kept_positions, measure_group, record_units
from tightfit.remat.options import RECOMPUTE, SAVE_LINEAR, SAVE_MATMUL, STORE


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(512, 512), nn.Tanh()) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x.sum()


def test_a_weight_view_is_not_counted_as_kept() -> None:
    """nn.Linear runs addmm on ``weight.t()``, a view of a parameter: the block keeps its output (tanh
    saves it) and nothing of its 1 MiB weight."""
    model, x = Chain(), torch.randn(4, 512)
    group = find_blocks(model, x).groups[0]
    costs = measure_group(group, reps=1, op_level=False)
    out_bytes = 4 * 512 * 4
    assert costs[STORE].keep == out_bytes  # tanh's output, kept for its backward and as the block output
    # checkpoint keeps the output (the input was made outside) and its stash of the CPU RNG state
    assert costs[RECOMPUTE].keep == out_bytes + torch.get_rng_state().nbytes
    weight_bytes = 512 * 512 * 4
    assert costs[STORE].bwd_peak >= weight_bytes  # the weight's gradient is made in the backward


class ConvChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                *(m for _ in range(2) for m in (nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))
            )
            for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x.sum()


class Attention(nn.Module):
    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ q.transpose(-1, -2), dim=-1) @ q


class AttnChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), Attention()) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x.sum()


def test_options_keeping_the_same_ops_are_measured_once() -> None:
    """In a conv block the convolutions are all its matmuls and all its projections: save-linear keeps what
    save-matmul keeps, so it is not run again and gets the same costs (times included, which two separate
    timings would not give). With attention (bmm) the two keep different ops and are both measured."""
    torch.manual_seed(0)
    # 32x32 maps, 32 tokens below: the blocks' tensors outweigh the CPU RNG state a recompute stashes (5 KiB)
    conv = find_blocks(ConvChain().train(), torch.randn(2, 4, 32, 32)).groups[0]
    ops = record_units(conv).ops
    assert kept_positions(SAVE_LINEAR, ops) == kept_positions(SAVE_MATMUL, ops) != frozenset()
    seen: list[str] = []
    costs = measure_group(conv, reps=1, on_option=seen.append)
    assert seen.count(SAVE_LINEAR) == 1  # reported to the progress callback, like a measured option
    assert costs[SAVE_LINEAR] == replace(costs[SAVE_MATMUL], option=SAVE_LINEAR)
    assert costs[SAVE_LINEAR].exact and costs[SAVE_LINEAR].fwd_time > 0

    attn = find_blocks(AttnChain(), torch.randn(2, 32, 8)).groups[0]
    ops = record_units(attn).ops
    assert kept_positions(SAVE_LINEAR, ops) < kept_positions(SAVE_MATMUL, ops)
    costs = measure_group(attn, reps=1)
    # here keeping the matmuls keeps as much as storing (not worth timing, dropped), keeping only the
    # projection keeps less: measured on its own, not taken for save-matmul's twin
    assert SAVE_MATMUL not in costs
    assert costs[SAVE_LINEAR].keep < costs[STORE].keep


def test_an_option_costs_at_least_the_ops_it_recomputes() -> None:
    """Timed alone, recomputing can look free (store slower for other reasons); the extra time is raised
    to the recorded forward time of the ops the option recomputes, and left alone when above it."""
    from tightfit.remat.measure import OpProfile, _at_least_the_recomputed_ops
    from tightfit.remat.solvers.chain_costs import OptionCost

    aten = torch.ops.aten
    profile = OpProfile([aten.mm.default, aten.relu.default], [], [0.5, 0.25])
    costs = {
        STORE: OptionCost(STORE, 100, 0, 0, 1.0, 2.0),
        SAVE_MATMUL: OptionCost(SAVE_MATMUL, 60, 0, 0, 1.0, 2.0),  # keeps mm: recomputes relu (0.25 s)
        RECOMPUTE: OptionCost(RECOMPUTE, 10, 0, 0, 1.0, 2.1),  # recomputes both (0.75 s)
        SAVE_LINEAR: OptionCost(SAVE_LINEAR, 60, 0, 0, 1.0, 2.4),  # already 0.4 s over store
    }
    _at_least_the_recomputed_ops(costs, profile)
    extra = {o: c.fwd_time + c.bwd_time - 3.0 for o, c in costs.items()}
    assert extra[STORE] == 0
    assert abs(extra[SAVE_MATMUL] - 0.25) < 1e-12
    assert abs(extra[RECOMPUTE] - 0.75) < 1e-12
    assert abs(extra[SAVE_LINEAR] - 0.4) < 1e-12
