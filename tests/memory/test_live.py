"""The live tracker against torch's profiler, which sees every allocation of the CPU allocator."""

import torch
from torch import nn

from tightfit.memory import LiveTracker
from tightfit.memory.allocator import allocator_peak
from tightfit.testing import mlp


def test_peak_equals_profiler_on_a_training_step():
    model = mlp(512)
    x = torch.randn(128, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step():
        loss = (model(x) ** 2).mean()
        loss.backward()
        opt.step()

    step()  # creates the momentum buffers
    opt.zero_grad(set_to_none=True)
    with LiveTracker(track=[model, opt, x]) as tracker:
        step()
    opt.zero_grad(set_to_none=True)
    expected = allocator_peak(step)
    assert tracker.peak - tracker.baseline == expected
    assert expected > 0


def test_tracks_frees_views_and_reports_where_the_peak_is():
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 8))
    x = torch.randn(32, 64)
    with LiveTracker(root=model, timeline=True) as tracker:
        tracker.phase = "forward"
        h = model(x)
        big = torch.empty(1000, 1000)
        view = big[:10]
        del big
        assert tracker.current >= 4_000_000  # the view keeps the whole storage alive
        del view
        tracker.phase = "after"
        h.sum()
    assert tracker.peak >= 4_000_000 + 32 * 256 * 4
    assert tracker.peak_phase == "forward"
    assert tracker.current < 1_000_000
    assert tracker.timeline and max(p.live_bytes for p in tracker.timeline) == tracker.peak
    assert set(tracker.module_peaks) >= {"", "0", "1", "2"}


def test_peak_module_is_the_innermost_running_module():
    class Wide(nn.Module):
        def forward(self, x):
            return (x.repeat(1, 100) * 2).sum(dim=1, keepdim=True)

    model = nn.Sequential(nn.Linear(16, 16), nn.Sequential(nn.ReLU(), Wide()))
    with LiveTracker(root=model) as tracker:
        model(torch.randn(64, 16))
    assert tracker.peak_module == "1.1"


def test_counts_the_rng_state_checkpoint_stashes_per_region_and_restores_get_rng_state():
    """``checkpoint`` stashes the CPU RNG state (made outside the dispatcher) for each region it opens."""
    from torch.utils.checkpoint import checkpoint

    layer = nn.Linear(64, 64)
    x = torch.randn(8, 64, requires_grad=True)
    original = torch.get_rng_state
    with LiveTracker(track=[layer, x]) as plain:
        y = layer(x)
    with LiveTracker(track=[layer, x]) as ckpt:
        z = checkpoint(layer, x, use_reentrant=False)
    del y, z
    assert torch.get_rng_state is original
    stash = original().nbytes
    assert stash > 0
    # the checkpointed call keeps its output but not the layer's saved input: only the stash is extra
    assert ckpt.peak - ckpt.baseline == plain.peak - plain.baseline + stash
