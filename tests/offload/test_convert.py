"""convert_ with Offload: module surgery and undo, block finding, bad input (no accelerator, host budget,
nesting), the region context, the planner-facing estimates, the config, and a Hugging Face model."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

import tightfit
from tests.offload.test_mechanism import Net, _grads, _x
from tightfit.offload import (
    HostBudgetExceeded,
    NestedOffload,
    NoBlocks,
    Offload,
    OffloadUnavailable,
    SimulatedTarget,
    available,
    copy_seconds,
    estimate_block,
    estimate_host_bytes,
    exposed_seconds,
    find_blocks,
    offloader_of,
    offloading,
)


def test_convert_keeps_state_dict_types_and_undo_restores() -> None:
    model = Net()
    originals = list(model.blocks)
    keys = {k: v for k, v in model.state_dict().items()}
    report = tightfit.convert_(model, tightfit.Offload(min_bytes=0), target=SimulatedTarget())
    assert [p for p, _, _ in report.converted] == [f"blocks.{i}" for i in range(4)]
    assert all(isinstance(b, type(originals[0])) and b is not o for b, o in zip(model.blocks, originals))
    after = model.state_dict()
    assert list(after) == list(keys) and all(after[k] is not None and after[k].data_ptr() == v.data_ptr()
                                             for k, v in keys.items())
    assert "Offload" in str(report) and report.metrics["blocks"] == 4
    off = offloader_of(model)
    _grads(model, _x())
    assert off.host_bytes > 0
    report.undo()
    assert all(b is o for b, o in zip(model.blocks, originals)) and offloader_of(model) is None


def test_filter_fn_and_explicit_blocks() -> None:
    model = Net()
    report = tightfit.convert_(model, Offload(), lambda m, p: p != "blocks.1", target=SimulatedTarget())
    assert report.skipped == [("blocks.1", "filter_fn returned False")] and len(report) == 3
    again = tightfit.convert_(model, Offload(), target=SimulatedTarget())
    assert len(again) == 1 and ("blocks.0", "already offloaded") in again.skipped
    again.undo()
    report.undo()
    model = Net()
    assert len(tightfit.convert_(model, Offload(), blocks=[model.blocks[0], "blocks.2"],
                                 target=SimulatedTarget())) == 2
    with pytest.raises(NoBlocks, match="nest"):
        tightfit.convert_(Net(), Offload(), blocks=["blocks", "blocks.0"], target=SimulatedTarget())
    with pytest.raises(NoBlocks, match="no blocks found"):
        tightfit.convert_(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), Offload(), target=SimulatedTarget())


def test_cpu_model_without_a_target_is_refused_clearly() -> None:
    model = Net()
    with pytest.raises(OffloadUnavailable, match="accelerator.*cpu.*SimulatedTarget") as info:
        tightfit.convert_(model, Offload())
    assert isinstance(info.value, ValueError)
    assert type(model.blocks[0]).__name__ == "Block"  # unchanged
    assert not available("cpu") and not available("meta")
    with pytest.raises(OffloadUnavailable):
        with offloading(model):
            pass


def test_host_budget_estimated_before_converting() -> None:
    model = Net()
    x = _x()
    host, planned = estimate_host_bytes(model, x, Offload(min_bytes=0), target=SimulatedTarget())
    assert len(planned) == 4 and host == sum(n for _, n in planned[:3]) > 0
    with pytest.raises(HostBudgetExceeded, match=rf"\({host} bytes\).*max_host_bytes"):
        tightfit.convert_(model, Offload(min_bytes=0, max_host_bytes=host - 1), target=SimulatedTarget(),
                          example=x)
    assert type(model.blocks[0]).__name__ == "Block"  # nothing changed
    report = tightfit.convert_(model, Offload(min_bytes=0, max_host_bytes=host), target=SimulatedTarget(),
                               example=x)
    assert report.metrics["host_bytes_estimate"] == host
    _grads(model, x)
    assert offloader_of(model).host_bytes == host  # the estimate is exact


def test_host_budget_exceeded_at_run_time_leaves_nothing_hooked() -> None:
    model = Net()
    target = SimulatedTarget()
    tightfit.convert_(model, Offload(min_bytes=0, max_host_bytes="64KiB"), target=target)
    with pytest.raises(HostBudgetExceeded, match="max_host_bytes is 64.00 KiB"):
        model(_x())
    gc.collect()
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert offloader_of(model).pool.in_use == 0


def test_region_matches_plain_and_restores_classes_and_nesting_is_refused() -> None:
    model = Net()
    ref = copy.deepcopy(model)
    x = _x()
    target = SimulatedTarget()
    g_ref = _grads(ref, x)
    for p in model.parameters():
        p.grad = None
    with offloading(model, Offload(min_bytes=0), target=target) as off:
        assert type(model.blocks[0]).__name__ == "OffloadedBlock"
        with pytest.raises(NestedOffload, match="do not nest"):
            with offloading(model, target=target):
                pass
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            loss = model(x)
    loss.backward()  # after the region
    assert type(model.blocks[0]).__name__ == "Block" and "_tightfit_offloader" not in model.blocks[0].__dict__
    assert all(torch.equal(a, p.grad) for a, p in zip(g_ref, model.parameters()))
    assert off.stats.offloaded > 0 and off.stats.restored > 0
    tightfit.convert_(model, Offload(), target=target)
    with pytest.raises(NestedOffload, match="already offloaded"):
        with offloading(model, target=target):
            pass


def test_block_scopes_in_user_code_and_nested_scopes() -> None:
    lin = nn.Linear(32, 32)
    x = torch.randn(64, 32, requires_grad=True)
    target = SimulatedTarget()
    with offloading(config=Offload(min_bytes=0, keep_last=0), target=target) as off:
        with off.block("a"):
            h = torch.tanh(lin(x))
        with off.block("b"):
            with pytest.raises(NestedOffload, match="'b'"):
                with off.block("c"):
                    pass
            y = torch.sigmoid(h).sum()
    y.backward()
    # a: x (the matmul keeps it for the weight gradient) and tanh's output; b: sigmoid's output
    assert off.stats.groups == 2 and off.stats.offloaded == 3 and off.stats.restored == 3
    x2 = x.detach().clone().requires_grad_()
    torch.sigmoid(torch.tanh(lin(x2))).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    with pytest.raises(OffloadUnavailable, match="target="):
        with offloading():
            pass


def test_estimates_for_planners() -> None:
    block = Net().blocks[0]
    x = torch.randn(8, 16, 32)
    target = SimulatedTarget(bandwidth=1e9)
    est = estimate_block(lambda: block(x), Offload(min_bytes=0), target=target, protect=block)
    # LayerNorm's input, fc's input, GELU's input, out's input, the dropout mask (the weights are refused)
    assert est.tensors >= 4 and est.host_bytes >= 2 * 4 * x.numel() + 2 * 16 * x.numel()
    assert est.skipped_bytes["parameter"] > 0
    assert target.host_allocs == 0 and target.d2h == 0  # nothing moved
    assert copy_seconds(2_000_000, 1e9) == pytest.approx(2e-3)
    assert exposed_seconds(2_000_000, 1e-3, 5e-3, 1e9) == pytest.approx(1e-3)
    assert exposed_seconds(2_000_000, 3e-3, 5e-3, 1e9) == 0.0


def test_config_defaults_validation_and_json() -> None:
    c = Offload(min_bytes="1MiB", max_host_bytes="2GiB")
    assert c.min_bytes == 2**20 and c.max_host_bytes == 2 * 2**30
    assert Offload.from_json(c.to_json()) == c and Offload().keep_last == 1
    for bad in ({"keep_last": -1}, {"max_in_flight": 0}, {"prefetch": 1.5}, {"pin": "x"},
                {"min_bytes": "lots"}, {"host_bandwidth": 0}, {"min_bytes": True}):
        with pytest.raises(ValueError):
            Offload(**bad)
    with pytest.raises(ValueError, match="unknown Offload fields"):
        Offload.from_dict({"min_byte": 1})
    assert tightfit.Offload is Offload


def test_hugging_face_gpt2_blocks_found_and_gradients_exact() -> None:
    pytest.importorskip("transformers")
    from tightfit import zoo

    model_factory, batch_factory = zoo.get("gpt2-tiny")
    model = model_factory()
    model.train()
    batch = batch_factory(batch_size=2, seq_len=32)
    assert find_blocks(model) == ["transformer.h.0", "transformer.h.1"]
    ref = copy.deepcopy(model)
    target = SimulatedTarget(copy_delay=2)
    tightfit.convert_(model, Offload(min_bytes=0, keep_last=0), target=target)
    grads = []
    for m in (ref, model):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            m(**batch).loss.backward()
        grads.append([p.grad for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert offloader_of(model).stats.offloaded > 0 and target.races == 0


def test_hugging_face_checkpointing_only_the_checkpoint_inputs_move() -> None:
    """The converted block's __call__ wraps GradientCheckpointingLayer's, so the scope is outside the
    checkpoint: per block, only the hidden states the checkpoint keeps move."""
    pytest.importorskip("transformers")
    from tightfit import zoo

    model_factory, batch_factory = zoo.get("gpt2-tiny")
    model = model_factory()
    model.train()
    batch = batch_factory(batch_size=2, seq_len=32)
    ref = copy.deepcopy(model)
    for m in (ref, model):
        m.activation_checkpointing_enable()
    tightfit.convert_(model, Offload(min_bytes=0, keep_last=0), target=SimulatedTarget())
    grads = []
    for m in (ref, model):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            m(**batch).loss.backward()
        grads.append([p.grad for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    stats = offloader_of(model).stats
    hidden = 2 * 32 * model.config.n_embd * 4
    assert stats.offloaded == 2 and stats.offloaded_bytes == 2 * hidden and stats.restored == 2
