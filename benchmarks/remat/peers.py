"""PyTorch's own ways to checkpoint, applied to the benchmark models: the peers tightfit is measured against.

* `per_block_checkpoint`: non-reentrant `torch.utils.checkpoint.checkpoint` around every k-th block;
* `install_sequential`: `checkpoint_sequential` over a chain of blocks, in n segments;
* `segment_checkpoint`: `checkpoint` over every k consecutive time steps of the zoo LSTM (`rnn.run`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def per_block_checkpoint(blocks: Sequence[torch.nn.Module], every: int) -> None:
    """Wrap blocks i % every == 0 in non-reentrant `checkpoint` (instance-level forward patch)."""
    from torch.utils.checkpoint import checkpoint

    for i, b in enumerate(blocks):
        if i % every == 0:
            fwd = b.forward

            def wrapped(*args, _fwd=fwd, **kwargs):
                return checkpoint(_fwd, *args, use_reentrant=False, **kwargs)

            b.forward = wrapped


class SequentialRunner(torch.nn.Module):
    """Runs a list of blocks through `checkpoint_sequential` (extra args are passed to every block).

    Stands in place of a chain container (a one-element ModuleList or Sequential), so the model's own loop
    calls it once with the hidden state. Note: PyTorch does not checkpoint the last segment.
    """

    def __init__(self, blocks: Sequence[torch.nn.Module], segments: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        self.segments = segments

    def forward(self, x, *args, **kwargs):
        from torch.utils.checkpoint import checkpoint_sequential

        fns = [(lambda h, _b=b: _b(h, *args, **kwargs)) for b in self.blocks]
        return checkpoint_sequential(fns, self.segments, x, use_reentrant=False)


def _get(model: torch.nn.Module, path: str) -> torch.nn.Module:
    return model.get_submodule(path)


def _set(model: torch.nn.Module, path: str, value: torch.nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, value)


def chain_blocks(model: torch.nn.Module, paths: list[str]) -> list[torch.nn.Module]:
    return [b for p in paths for b in _get(model, p)]


def install_sequential(model: torch.nn.Module, paths: list[str], segments: int) -> None:
    """Replace the chain's containers by one `checkpoint_sequential` runner over all of its blocks.

    Valid when the containers run back to back with nothing in between (GPT-2's `h`, ResNet's stages).
    """
    blocks = chain_blocks(model, paths)
    for i, p in enumerate(paths):
        kind = type(_get(model, p))
        items = [SequentialRunner(blocks, segments)] if i == 0 else []
        _set(model, p, kind(*items) if issubclass(kind, torch.nn.Sequential) else kind(items))


def segment_checkpoint(model: torch.nn.Module, k: int) -> None:
    """Run `model.rnn` as segments of k time steps, each under non-reentrant `checkpoint`.

    Only the (h, c) state at segment boundaries (and each segment's outputs) stays alive through the forward.
    """
    from torch.utils.checkpoint import checkpoint

    rnn = model.rnn

    def forward(xs: torch.Tensor, state=None):
        state = rnn.initial_state(xs) if state is None else state
        outs = []
        for s in range(0, xs.shape[1], k):
            out, state = checkpoint(rnn.run, xs, state, s, min(s + k, xs.shape[1]), use_reentrant=False)
            outs.append(out)
        return torch.cat(outs, dim=1), state

    rnn.forward = forward
