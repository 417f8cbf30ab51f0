"""The ruler per device, storage resizes, and profile leaving everything as it found it."""

import dataclasses

import pytest
import torch
from torch import nn

import tightfit
from tightfit.errors import InvalidInput
from tightfit.memory import LiveTracker, MemoryReport
from tightfit.testing import mlp


def test_peak_by_device_counts_each_device_alone():
    host = torch.randn(1000)  # 4000 bytes
    with LiveTracker(track=[host]) as t:
        a = torch.empty(2000, device="meta")  # 8000 bytes on meta
        del a
        b = torch.empty(500)  # 2000 bytes on cpu, after the meta tensor died
        del b
    assert t.peak_by_device == {"cpu": 6000, "meta": 8000}
    assert t.peak == 12000  # the total's peak: host + meta while both lived
    assert t.current_by_device == {"cpu": 4000, "meta": 0}


def test_storage_resize_to_zero_and_back_is_counted():
    """What FSDP2 does to a gathered parameter: resize_(0) after use, resize_(n) before the backward."""
    w = torch.empty(1000)
    nbytes = w.untyped_storage().nbytes()
    with LiveTracker(track=[w], timeline=True) as t:
        w.untyped_storage().resize_(0)
        after_free = t.current
        w.untyped_storage().resize_(nbytes)
        after_regrow = t.current
        fresh = torch.empty(0)
        fresh.untyped_storage().resize_(800)  # unseen until its resize: counted from there
        with_fresh = t.current
    assert after_free == t.baseline - nbytes
    assert after_regrow == t.baseline
    assert with_fresh == t.baseline + 800
    assert torch.UntypedStorage.resize_ is not None and "counted" not in torch.UntypedStorage.resize_.__name__
    del fresh


def test_untracked_storage_seen_in_place_counts_from_the_start():
    """A tensor made before the tracker and not tracked (DDP's buckets), written into mid-step."""
    bucket = torch.zeros(1000)
    with LiveTracker() as t:
        x = torch.randn(2000)  # 8000 bytes
        del x
        bucket.add_(1.0)  # in place: the bucket was live all along
    assert t.baseline == 4000
    assert t.peak == 12000  # the earlier peak is raised by the bucket's bytes too
    assert t.peak_by_device == {"cpu": 12000}


def test_profile_reports_peak_by_device_and_round_trips_json():
    model, x = mlp(64), torch.randn(8, 256)
    report = tightfit.profile(model, x, loss_fn=lambda y: y.sum(), time_steps=0)
    assert report.peak_by_device == {"cpu": report.peak_bytes}
    assert report.rank == 0 and report.world_size == 1 and len(report.ranks) == 1
    assert report.ranks[0].peak_bytes == report.peak_bytes
    again = MemoryReport.from_dict(report.to_dict())
    assert again.peak_by_device == report.peak_by_device and again.ranks == report.ranks


def test_profile_leaves_model_optimizer_grads_and_rng_as_they_were():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.3), nn.BatchNorm1d(64), nn.GELU(), nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    x = torch.randn(16, 32)
    model(x).sum().backward()
    opt.step()  # optimizer state exists; grads exist and stay
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    grads = [p.grad for p in model.parameters()]
    grad_values = [g.clone() for g in grads]
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    rng = torch.get_rng_state()
    report = tightfit.profile(model, x, loss_fn=lambda y: y.sum(), optimizer=opt, time_steps=2)
    assert report.peak_bytes > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(g is p.grad for g, p in zip(grads, model.parameters()))
    assert all(torch.equal(v, p.grad) for v, p in zip(grad_values, model.parameters()))
    assert all(torch.equal(v, opt.state[model[0].weight][k]) for k, v in state.items())


def test_profile_leaves_gradient_values_of_parameters_outside_the_optimizer():
    # the optimizer holds only the last layer: backward would add into the first layer's .grad in place
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    x = torch.randn(8, 8)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    tightfit.profile(model, x, loss_fn=lambda y: y.sum(), optimizer=opt, time_steps=2)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_profile_removes_the_optimizer_state_it_created():
    model = mlp(32)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(4, 256)
    rng = torch.get_rng_state()
    tightfit.profile(model, x, loss_fn=lambda y: y.sum(), optimizer=opt, time_steps=1)
    assert len(opt.state) == 0
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("batch", ["hello", 3, None, [], {"mask": None}])
def test_bad_batch_is_refused_naming_what_a_batch_may_be(batch):
    with pytest.raises(InvalidInput, match="a batch must be a tensor .*tuple/list .*dict"):
        tightfit.profile(mlp(32), batch)


@dataclasses.dataclass
class _Batch:
    x: torch.Tensor


class _TakesBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 1)

    def forward(self, b: _Batch) -> torch.Tensor:
        return self.lin(b.x).sum()


def test_the_models_own_batch_object_is_passed_as_model_batch_and_counted_as_input():
    batch = _Batch(torch.randn(8, 16))
    report = tightfit.profile(_TakesBatch(), batch, time_steps=1)
    assert report.inputs_bytes == batch.x.nbytes
    assert report.peak_bytes >= report.inputs_bytes + report.params_bytes
