"""Finding blocks: transformer layers, ResNet stages, U-Net levels, LSTM time steps; identical blocks
grouped; a clear error when there is no chain."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tightfit.remat.blocks import find_blocks
from tightfit.testing import build


@pytest.mark.parametrize(
    ("name", "prefix", "count", "groups"),
    [
        ("gpt2-tiny", "transformer.h.", 4, 2),
        ("bert-base-tiny", "bert.encoder.layer.", 4, 2),
        ("llama-1b-tiny", "model.layers.", 4, 2),
        ("resnet50-tiny", "stages.", 4, 7),
        ("unet-tiny", "downs.", 2, 6),
    ],
)
def test_zoo_blocks(name: str, prefix: str, count: int, groups: int) -> None:
    model, batch = build(name)
    blocks = find_blocks(model, batch)
    paths = [b.path for b in blocks.blocks]
    assert sum(p.startswith(prefix) for p in paths) == count
    assert len(blocks.groups) == groups  # identical layers share one group (measured once)
    assert len(paths) == len(set(paths))


def test_transformer_layers_after_the_first_share_a_group() -> None:
    model, batch = build("gpt2-tiny")
    blocks = find_blocks(model, batch)
    layer_groups = [b.group for b in blocks.blocks if b.path.startswith("transformer.h.")]
    assert len(set(layer_groups)) == 1


def test_lstm_time_steps_are_blocks() -> None:
    model, batch = build("lstm-tiny")
    blocks = find_blocks(model, batch)
    steps = [b for b in blocks.blocks if b.path == "rnn.cells.0"]
    assert [b.call for b in steps] == list(range(12))
    assert "rnn.cells.0[3]" in [b.name for b in blocks.blocks]
    # the first step (zero state, no grad) differs from the others; the rest are measured once
    assert len({b.group for b in steps}) == 2


def test_blocks_recorded_during_a_training_step_ignore_recomputation_in_backward() -> None:
    """The planner records blocks during its timed step: a model that checkpoints its own layers calls
    them again inside the backward, which must not add blocks."""
    from torch.utils.checkpoint import checkpoint

    mlp = lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))  # noqa: E731

    class SelfCheckpointed(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self:
                x = checkpoint(layer, x, use_reentrant=False)
            return x

    model = SelfCheckpointed(mlp(), mlp(), mlp())
    x = torch.randn(2, 8)
    recomputed = []
    model[1].register_forward_pre_hook(lambda *_: recomputed.append(torch.is_grad_enabled()))
    plain = find_blocks(model, x)
    stepped = find_blocks(model, x, run=lambda: model(x).sum().backward())
    assert len(recomputed) == 3  # probe forward, step forward, recomputation in the backward
    assert [(b.path, b.call) for b in stepped.blocks] == [(b.path, b.call) for b in plain.blocks]
    assert [b.path for b in stepped.blocks] == ["0", "1", "2"]


def test_sequential_of_layers_is_split_into_its_composite_children_only() -> None:
    mlp = lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))  # noqa: E731
    model = nn.Sequential(mlp(), mlp(), mlp())
    blocks = find_blocks(model, torch.randn(2, 8))
    assert [b.path for b in blocks.blocks] == ["0", "1", "2"]
    # the first block's input does not require grad, the others' do: two groups
    assert [b.group for b in blocks.blocks] == [0, 1, 1]
    assert blocks.source == "children of the root module"


def test_no_chain_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no chain of blocks"):
        find_blocks(nn.Linear(4, 1), torch.randn(2, 4))


def test_kv_cache_is_rejected() -> None:
    model, batch = build("gpt2-tiny")
    with pytest.raises(ValueError, match="use_cache=False"):
        find_blocks(model, {**batch, "use_cache": True})


def test_unet_skip_connections_are_detected_and_chains_have_none() -> None:
    model, batch = build("unet-tiny")
    blocks = find_blocks(model, batch)
    names = [b.name for b in blocks.blocks]
    into = sorted({names[j] for _, j in blocks.skips})
    assert into == ["ups.0", "ups.1"]
    model, batch = build("gpt2-tiny")
    assert find_blocks(model, batch).skips == []


def test_skip_tensors_of_a_stacked_rnn_carry_their_bytes() -> None:
    model, batch = build("lstm-tiny")
    blocks = find_blocks(model, batch)
    names = [b.name for b in blocks.blocks]
    top = [j for j, n in enumerate(names) if n.startswith("rnn.cells.1[")]
    assert len(top) == batch["x"].shape[1]
    b, h = batch["x"].shape[0], model.config.hidden_size
    for prev, nxt in zip(top, top[1:]):  # layer 1's (h, c) skips over layer 0's step to layer 1's next
        tensors = blocks.skip_tensors[(prev, nxt)]
        assert sorted(tensors.values()) == [4 * b * h, 4 * b * h]
    assert set(blocks.skips) == set(blocks.skip_tensors)
