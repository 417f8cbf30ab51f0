"""The offload mechanism on the CPU with a simulated device and host (`SimulatedTarget`): exact gradients
with dropout, each offloaded storage restored once, parameters never moved, the prefetch order, nothing
left behind after a step, the pool reused, no early free under a slow copy, clean failure mid-forward."""

from __future__ import annotations

import collections
import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import tightfit
from tightfit.memory import LiveTracker
from tightfit.offload import Offload, Offloader, SimulatedTarget, offloader_of


class Block(nn.Module):
    """Pre-LN MLP block with dropout: saves LayerNorm input, fc input, GELU input, dropout mask."""

    def __init__(self, d: int, fail: bool = False) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)
        self.drop = nn.Dropout(0.1)
        self.fail = fail
        self.ckpt = False

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out(F.gelu(self.fc(self.ln(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("boom")
        if self.ckpt:
            return x + checkpoint(self.inner, x, use_reentrant=False)
        return x + self.inner(x)


class Net(nn.Module):
    def __init__(self, d: int = 32, n: int = 4) -> None:
        super().__init__()
        self.emb = nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.emb(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x).square().mean()


def _grads(model: nn.Module, x: torch.Tensor, seed: int = 1) -> list[torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model(x).backward()
    return [p.grad.clone() for p in model.parameters()]


def _pair(config: Offload, target: SimulatedTarget, **kw):
    model = Net()
    ref = copy.deepcopy(model)
    report = tightfit.convert_(model, config, target=target, trace=True, **kw)
    return model, ref, report, offloader_of(model)


def _x() -> torch.Tensor:
    return torch.randn(8, 16, 32)


@pytest.mark.parametrize("delay", [0, 3])
def test_gradients_bit_identical_with_dropout(delay: int) -> None:
    target = SimulatedTarget(copy_delay=delay)
    model, ref, _, off = _pair(Offload(min_bytes=0), target)
    x = _x()
    for _ in range(2):  # two steps: the second runs on the reused pool
        assert all(torch.equal(a, b) for a, b in zip(_grads(ref, x), _grads(model, x)))
    assert off.stats.offloaded > 0 and target.races == 0
    # the dropout masks differ between seeds, so equality above is not vacuous
    assert not all(torch.equal(a, b) for a, b in zip(_grads(ref, x, seed=2), _grads(model, x, seed=1)))


def test_each_offloaded_storage_restored_exactly_once_and_parameters_never_move() -> None:
    target = SimulatedTarget(copy_delay=0)
    model, ref, _, off = _pair(Offload(min_bytes=0, max_in_flight=1), target)
    _grads(model, _x())
    d2h = [host for kind, host, _ in target.copies if kind == "d2h"]
    h2d = collections.Counter(host for kind, host, _ in target.copies if kind == "h2d")
    assert len(d2h) == off.stats.offloaded == len(set(d2h)) > 0
    # every copy landed before the backward, so every offloaded storage came back, once
    assert set(h2d) == set(d2h) and set(h2d.values()) == {1}
    assert off.stats.restored == off.stats.offloaded
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not params & {dev for kind, _, dev in target.copies if kind == "d2h"}
    assert off.stats.skipped_bytes["parameter"] > 0  # they were saved, and refused


def test_prefetch_order_block_i_minus_1_when_block_i_backward_starts() -> None:
    target = SimulatedTarget()
    model, _, _, off = _pair(Offload(min_bytes=0, prefetch=1), target)
    _grads(model, _x())
    events = [e for e in off.trace if e[0] != "d2h"]
    # the last block (3) stays on the device; 2, 1, 0 were offloaded
    assert events == [("unpack", 3), ("fetch", 3), ("fetch", 2), ("unpack", 2), ("fetch", 1),
                      ("unpack", 1), ("fetch", 0), ("unpack", 0)]
    assert {i for kind, i in off.trace if kind == "d2h"} == {0, 1, 2}


def test_prefetch_two_ahead() -> None:
    target = SimulatedTarget()
    model, _, _, off = _pair(Offload(min_bytes=0, prefetch=2, keep_last=0), target)
    _grads(model, _x())
    events = [e for e in off.trace if e[0] != "d2h"]
    assert events[:4] == [("unpack", 3), ("fetch", 3), ("fetch", 2), ("fetch", 1)]


def test_no_bytes_left_behind_and_pool_reused() -> None:
    target = SimulatedTarget()
    model, _, _, off = _pair(Offload(min_bytes=0), target)
    x = _x()
    _grads(model, x)  # gradients exist before the measured steps, as in training
    off.pool.release()
    allocs_before = target.host_allocs
    gc.collect()
    with LiveTracker(track=[model, x]) as t:
        before = t.current
        _grads(model, x)
        gc.collect()
        after = t.current
    first_pool = off.host_bytes
    assert first_pool > 0 and target.host_allocs > allocs_before
    assert after - before == first_pool  # everything but the pool is gone
    assert off.pool.in_use == 0 and off.pending()["entries"] == 0
    allocs = target.host_allocs
    gc.collect()
    with LiveTracker(track=[model, x, off.pool.free_buffers()]) as t:
        before = t.current
        _grads(model, x)
        gc.collect()
        after = t.current
    assert after == before
    assert target.host_allocs == allocs and off.host_bytes == first_pool  # no new host buffers


def test_slow_copy_no_race_and_the_simulator_catches_an_early_free() -> None:
    target = SimulatedTarget(copy_delay=1000)  # copies run only when waited on
    model, ref, _, off = _pair(Offload(min_bytes=0, max_in_flight=1), target)
    x = _x()
    assert all(torch.equal(a, b) for a, b in zip(_grads(ref, x), _grads(model, x)))
    assert target.races == 0 and off.stats.waits > 0

    class Eager(Offloader):  # a broken engine: drops the device storage as soon as the copy is queued
        def _copy_out(self, group):  # noqa: ANN001
            super()._copy_out(group)
            for entry in group.live():
                entry.storage = None

    model = Net()
    target = SimulatedTarget(copy_delay=1000)
    with pytest.raises(RuntimeError, match="offload race"):
        with tightfit.offload.offloading(model, Offload(min_bytes=0, max_in_flight=1), target=target) as o:
            o.__class__ = Eager
            model(_x()).backward()
    assert target.races >= 1


def test_exception_mid_forward_leaves_nothing_hooked_or_held() -> None:
    target = SimulatedTarget(copy_delay=5)
    model, _, _, off = _pair(Offload(min_bytes=0, keep_last=0), target)
    model.blocks[2].fail = True
    with pytest.raises(RuntimeError, match="boom"):
        model(_x())
    gc.collect()
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert off.pool.in_use == 0 and off.pending()["entries"] == 0
    assert target.d2h > 0  # copies had started: the failure came after them
    off.pool.release()  # every buffer is free, so every one can be unpinned
    assert off.host_bytes == 0 and target.host_frees == target.host_allocs > 0
    model.blocks[2].fail = False
    ref = copy.deepcopy(model)
    x = _x()
    assert all(torch.equal(a, b) for a, b in zip(_grads(ref, x), _grads(model, x)))


def test_no_grad_is_a_no_op() -> None:
    target = SimulatedTarget()
    model, _, _, off = _pair(Offload(min_bytes=0), target)
    with torch.no_grad():
        model(_x())
    assert off.stats.groups == 0 and target.host_allocs == 0 and off.host_bytes == 0


def test_only_what_a_checkpoint_keeps_is_offloaded() -> None:
    x = _x()
    target = SimulatedTarget()
    plain, _, _, off_plain = _pair(Offload(min_bytes=0), target)
    _grads(plain, x)
    model, ref, _, off = _pair(Offload(min_bytes=0), SimulatedTarget())
    for m in (model, ref):
        for b in m.blocks:
            b.ckpt = True
    assert all(torch.equal(a, b) for a, b in zip(_grads(ref, x), _grads(model, x)))
    # per block, the checkpoint keeps its input (one storage) and the residual add saves nothing
    assert off.stats.offloaded == 3 < off_plain.stats.offloaded
    assert off.stats.offloaded_bytes == 3 * x.numel() * 4


def test_block_checkpointed_from_outside_is_left_to_the_checkpoint() -> None:
    target = SimulatedTarget()
    model, ref, _, off = _pair(Offload(min_bytes=0), target)

    def forward(self, x):  # noqa: ANN001
        x = self.emb(x)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return self.head(x).square().mean()

    x = _x()
    g_ref = _grads(ref, x)
    Net.forward, old = forward, Net.forward
    try:
        got = _grads(model, x)
    finally:
        Net.forward = old
    assert all(torch.equal(a, b) for a, b in zip(g_ref, got))
    # 4 calls in the forward (inside each checkpoint region) and 4 in the backward (the recomputes)
    assert off.stats.groups == 0 and off.stats.skipped_calls == 8 and target.host_allocs == 0


def test_autocast_parameter_casts_stay() -> None:
    target = SimulatedTarget()
    model, ref, _, off = _pair(Offload(min_bytes=0), target)
    x = _x()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g_ref = _grads(ref, x)
        got = _grads(model, x)
    assert all(torch.equal(a, b) for a, b in zip(g_ref, got))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not params & {dev for kind, _, dev in target.copies if kind == "d2h"}
    # bf16 copies of the weights are saved by the matmuls; the cast cache keeps them, so they stay
    assert off.stats.skipped_bytes["parameter"] >= sum(
        2 * b.fc.weight.numel() + 2 * b.out.weight.numel() for b in model.blocks
    )
    assert off.stats.offloaded > 0


def test_gathered_parameter_and_its_views_never_move() -> None:
    """FSDP2's unsharded parameter is a real nn.Parameter outside the module's registered ones."""
    off = Offloader(Offload(min_bytes=0), SimulatedTarget())
    gathered = nn.Parameter(torch.randn(64, 64))
    assert off.reason(gathered) == "parameter"
    assert off.reason(gathered.t()) == "parameter"
    assert off.reason(gathered.to(torch.bfloat16)) == "parameter"
    assert off.reason(torch.randn(64, 64)) is None
    assert off.reason(torch.randn(4)) is None
    assert Offloader(Offload(), SimulatedTarget()).reason(torch.randn(4)) == "under min_bytes"


def test_composes_with_torch_compile_per_block() -> None:
    """Compiled blocks (aot_eager) with offload give the gradients of the same compiled blocks without it
    (dropout on)."""
    model = Net(n=3)
    ref = copy.deepcopy(model)
    target = SimulatedTarget()
    tightfit.convert_(model, Offload(min_bytes=0), target=target)
    for m in (model, ref):
        for b in m.blocks:
            b.forward = torch.compile(b.forward, backend="aot_eager")
    x = _x()
    assert all(torch.equal(a, b) for a, b in zip(_grads(ref, x), _grads(model, x)))
    off = offloader_of(model)
    assert off.stats.offloaded > 0 and off.stats.restored == off.stats.offloaded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_target_exact_pinned_pool_and_device_peak() -> None:
    device = torch.device("cuda")
    model = Net(d=512, n=6).to(device)
    ref = copy.deepcopy(model)
    x = torch.randn(8, 256, 512, device=device)
    report = tightfit.convert_(model, Offload())  # the real target: CudaTarget, exact-size pinned buffers
    off = offloader_of(model)
    for _ in range(2):
        with torch.random.fork_rng(devices=[device]):
            g_ref = _grads(ref, x)
        with torch.random.fork_rng(devices=[device]):
            got = _grads(model, x)
        assert all(torch.equal(a, b) for a, b in zip(g_ref, got))
    allocations = off.pool.allocations
    off.reset_stats()

    def peak(m: nn.Module) -> int:
        for p in m.parameters():
            p.grad = None
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        m(x).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    plain, offloaded = peak(ref), peak(model)
    moved = off.stats.offloaded_bytes
    assert moved > 0 and off.pool.allocations == allocations  # the second and third steps reused the pool
    assert off.host_bytes == moved  # exact sizes: the pool holds what one step moved, no rounding
    assert all(b.is_pinned() for b in off.pool.free_buffers())
    # of the 5 offloaded blocks, at least the 3 beyond max_in_flight=2 are off the device at the peak
    assert plain - offloaded >= 0.4 * moved, (plain, offloaded, moved)
    report.undo()
