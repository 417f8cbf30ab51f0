"""The live tracker against torch's profiler, which sees every allocation of the CPU allocator."""

import threading

import pytest
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


def test_another_threads_resizes_and_rng_reads_are_not_counted():
    kept = []

    def other() -> None:
        st = torch.empty(0).untyped_storage()
        st.resize_(1 << 20)
        kept.append((st, torch.get_rng_state()))

    with LiveTracker() as t:
        th = threading.Thread(target=other)
        th.start()
        th.join()
    assert t.peak == 0 and t.current == 0
    # the tracker's own thread is counted
    with LiveTracker() as t:
        st = torch.empty(0).untyped_storage()
        st.resize_(4096)
    assert t.peak == 4096


def test_trackers_exiting_out_of_order_in_two_threads_restore_torch():
    resize, rng = torch.UntypedStorage.resize_, torch.get_rng_state
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def thread_a() -> None:
        with LiveTracker():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def thread_b() -> None:
        a_in.wait(5)
        with LiveTracker():
            b_in.set()
            a_out.wait(5)

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert torch.UntypedStorage.resize_ is resize and torch.get_rng_state is rng


def test_an_exception_in_the_tracked_region_restores_torch():
    resize, rng = torch.UntypedStorage.resize_, torch.get_rng_state
    with pytest.raises(ZeroDivisionError):
        with LiveTracker():
            assert torch.UntypedStorage.resize_ is not resize and torch.get_rng_state is not rng
            raise ZeroDivisionError("in the tracked region")
    assert torch.UntypedStorage.resize_ is resize and torch.get_rng_state is rng
