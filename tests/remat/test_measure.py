"""Block measurements: what a block keeps is counted exactly, its parameters excluded."""

from __future__ import annotations

import torch
from torch import nn

from tightfit.remat.blocks import find_blocks
from tightfit.remat.execute import RECOMPUTE, STORE
from tightfit.remat.measure import measure_group


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
    assert costs[RECOMPUTE].keep == out_bytes  # checkpoint keeps the output (the input was made outside)
    weight_bytes = 512 * 512 * 4
    assert costs[STORE].bwd_peak >= weight_bytes  # the weight's gradient is made in the backward
