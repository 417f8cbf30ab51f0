"""The saved-tensor counter against hand-derived byte counts, inside and outside checkpoint regions."""

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from tightfit.memory import SavedTensorCounter
from tightfit.testing import Block, mlp


def test_mlp_saved_bytes_match_hand_derivation():
    model, batch, width = mlp(), 64, 1024
    x = torch.randn(batch, 256)
    with SavedTensorCounter(exclude=[model, x]) as c:
        model(x).sum()
    # ReLU output (saved by ReLU and by Linear2: one storage), Linear2 output (saved by GELU),
    # GELU output (saved by Linear3). x is an input, weights are parameters: not counted.
    assert c.bytes == 3 * batch * width * 4
    assert c.count == 3
    assert sum(c.per_module.values()) == c.bytes
    assert c.per_module == {"1": batch * width * 4, "2": batch * width * 4, "3": batch * width * 4}


def test_views_count_their_whole_storage_once():
    base = torch.randn(1000, 100, requires_grad=True)
    with SavedTensorCounter(exclude=[base]) as c:
        h = base * 2  # saves nothing of its own (scalar multiplier)
        (h[:10] ** 2).sum() + (h[10:20] ** 3).sum()
    assert c.bytes == 1000 * 100 * 4  # both pows save views of h: h's storage counts once, whole
    assert c.count == 1


def test_transformer_block_saved_bytes_match_hand_derivation():
    b, t, d, h = 2, 16, 32, 4
    block = Block(d, h)
    x = torch.randn(b, t, d, requires_grad=True)
    with SavedTensorCounter(exclude=[block, x]) as c:
        block(x).sum()
    # per token (fp32): ln1 mean+rstd 2, qkv input d, qkv output 3d (q, k, v are views of it, saved by
    # attention), attention output d (CPU flash attention returns it in (b, t, h, dh) memory order, so
    # the proj input is a view of it, not a copy) and logsumexp h, ln2 input d and mean+rstd 2, fc input
    # d, GELU input 4d, out input 4d.
    per_token = 2 + d + 3 * d + d + h + d + 2 + d + 4 * d + 4 * d
    assert c.bytes == b * t * per_token * 4
    # attributed to the module that created each storage; sums to the total
    row = b * t * 4
    assert c.per_module == {
        "ln1": row * (2 + d),  # mean, rstd and the normalised output (saved by qkv)
        "qkv": row * 3 * d,
        # the block's own ops: attention output and logsumexp, and the residual sum x + proj(...)
        "": row * (d + h + d),
        "ln2": row * (2 + d),
        "fc": row * 4 * d,
        "act": row * 4 * d,
    }


def _chain(width: int = 512):
    return nn.Sequential(
        *[nn.Sequential(nn.Linear(128, width), nn.GELU(), nn.Linear(width, 128)) for _ in range(4)]
    )


def _run(model: nn.Sequential, x: torch.Tensor, mode: str) -> torch.Tensor:
    policy = partial(create_selective_checkpoint_contexts, [torch.ops.aten.addmm.default])
    h = x
    for block in model:
        if mode == "plain":
            h = block(h)
        elif mode == "checkpoint":
            h = checkpoint(block, h, use_reentrant=False)
        else:
            h = checkpoint(block, h, use_reentrant=False, context_fn=policy)
    return h.sum()


def test_checkpoint_regions_are_counted():
    n, width = 64, 512
    model, x = _chain(width), torch.randn(n, 128, requires_grad=True)
    act, io = n * width * 4, n * 128 * 4
    counts = {}
    for mode in ("plain", "checkpoint", "sac"):
        with SavedTensorCounter(exclude=[model, x]) as c:
            loss = _run(model, x, mode)
        counts[mode] = c.bytes
        loss.backward()
    # plain: per block the first Linear's output (saved by GELU) and GELU's output (saved by Linear2),
    # plus the inputs of blocks 2..4.
    assert counts["plain"] == 4 * 2 * act + 3 * io
    # checkpoint: only the inputs of blocks 2..4 (block 1's input is x).
    assert counts["checkpoint"] == 3 * io
    # selective checkpoint caching addmm outputs: both Linear outputs of each block. The second one is
    # the next block's input, the same storage the checkpoint saves, so it counts once.
    assert counts["sac"] == 4 * (act + io)


def test_saved_tensors_of_a_checkpoint_region_match_live_memory():
    """What the counter reports for a SAC region is exactly what the forward leaves alive, but for the CPU
    RNG state checkpoint stashes per region (not a saved tensor; the live tracker counts it)."""
    from tightfit.memory import LiveTracker

    n = 32
    model, x = _chain(), torch.randn(n, 128, requires_grad=True)
    with LiveTracker(track=[model, x]) as live:
        with SavedTensorCounter(exclude=[model, x]) as c:
            loss = _run(model, x, "sac")
        left_alive = live.current - live.baseline
    stashes = len(model) * torch.get_rng_state().nbytes
    assert c.bytes == left_alive - loss.untyped_storage().nbytes() - stashes
