"""profile / estimate on whole training steps: categories, exact agreement, reports, bad input."""

import json

import pytest
import torch
from torch import nn

import tightfit
from tightfit.memory import MemoryReport
from tightfit.testing import Block


class TinyLM(nn.Module):
    def __init__(self, vocab=128, d=32, layers=2, dropout=0.1):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, 4) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids, labels=None):
        h = self.drop(self.emb(ids))
        for block in self.blocks:
            h = block(h)
        logits = self.head(h)
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def _factories():
    def model_factory():
        torch.manual_seed(0)
        return TinyLM()

    def batch_factory():
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 128, (4, 16), generator=g)
        return {"ids": ids, "labels": ids}

    return model_factory, batch_factory


def test_profile_categories_are_exact():
    model_factory, batch_factory = _factories()
    model, batch = model_factory(), batch_factory()
    opt = torch.optim.AdamW(model.parameters())
    report = tightfit.profile(model, batch, optimizer=opt)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert report.params_bytes == params
    assert report.grads_bytes == params
    assert report.optimizer_bytes == 2 * params + 4 * sum(1 for _ in model.parameters())  # m, v, step
    assert report.inputs_bytes == 4 * 16 * 8  # ids and labels are one tensor
    assert report.baseline_bytes == params + report.optimizer_bytes + report.inputs_bytes
    assert report.peak_bytes > report.baseline_bytes + report.activations_bytes
    assert sum(report.per_module.values()) == report.activations_bytes
    assert report.flops > 0 and report.step_time is not None and report.step_time > 0
    assert report.peak_phase in {"forward", "backward", "optimizer"}


def test_estimate_equals_profile():
    model_factory, batch_factory = _factories()
    model = model_factory()
    real = tightfit.profile(
        model, batch_factory(), optimizer=torch.optim.AdamW(model.parameters()), time_steps=0
    )
    fake = tightfit.estimate(model_factory, batch_factory, optimizer_factory=lambda p: torch.optim.AdamW(p))
    assert fake.estimated and not real.estimated
    for field in (
        "activations_bytes",
        "peak_bytes",
        "params_bytes",
        "grads_bytes",
        "optimizer_bytes",
        "flops",
    ):
        assert getattr(fake, field) == getattr(real, field), field
    assert fake.per_module == real.per_module
    assert fake.peak_op == real.peak_op


def test_report_renders_and_round_trips_json():
    model_factory, batch_factory = _factories()
    report = tightfit.profile(model_factory(), batch_factory(), time_steps=0)
    text = str(report)
    assert "activations saved for backward" in text and "peak live tensors" in text
    assert "blocks.0" in text or "blocks" in text
    data = json.loads(report.to_json())
    assert data["peak_bytes"] == report.peak_bytes
    assert MemoryReport.from_dict(data).per_module == report.per_module


def test_bad_input_is_reported_clearly():
    model_factory, batch_factory = _factories()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        tightfit.profile(lambda x: x, batch_factory())
    with pytest.raises(TypeError, match="loss"):
        tightfit.profile(nn.Linear(4, 4), torch.randn(2, 4))  # output is not a scalar
    frozen = nn.Linear(4, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        tightfit.profile(frozen, torch.randn(2, 4))


def test_parse_size():
    assert tightfit.parse_size("2GiB") == 2 * 2**30
    assert tightfit.parse_size("512MB") == 512 * 10**6
    assert tightfit.parse_size("1.5e9") == 1_500_000_000
    assert tightfit.parse_size(4096) == 4096
    assert tightfit.parse_size(" 3 mib ") == 3 * 2**20
    for bad in ("2 furlongs", "", "-1GB", "GiB", True, None):
        with pytest.raises((ValueError, TypeError), match="KiB"):
            tightfit.parse_size(bad)
    assert tightfit.format_size(1536) == "1.50 KiB"


def test_profile_does_not_change_what_it_measures():
    """Module tracking, the saved-tensor counter and the FLOP counter add no autograd hooks: the peak
    of a checkpointed model equals that of a bare LiveTracker around the same step."""
    from torch.utils.checkpoint import checkpoint

    from tightfit._step import forward_loss
    from tightfit.memory import LiveTracker

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) for _ in range(4)
            )

        def forward(self, x):
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x.square().mean()

    model, x = Checkpointed(), torch.randn(128, 64)
    with LiveTracker(track=[model, x]) as bare:
        forward_loss(model, x).backward()
    for p in model.parameters():
        p.grad = None
    report = tightfit.profile(model, x, time_steps=0)
    assert report.peak_bytes == bare.peak
    # the inputs of blocks 1..3 (checkpoint keeps them) and the last output (square saves its input)
    assert report.activations_bytes == 4 * 128 * 64 * 4
    backward_peaks = {m.path: m.backward_peak for m in report.modules}
    assert all(backward_peaks[f"blocks.{i}"] > 0 for i in range(4))


def test_timed_steps_wait_for_the_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels on an accelerator run asynchronously: every timed region must synchronize before and after."""
    from tightfit import _step

    calls: list[str] = []
    monkeypatch.setattr(_step, "_accelerator_sync", lambda: lambda: calls.append("sync"))
    model = torch.nn.Linear(4, 2)
    report = tightfit.profile(model, torch.randn(3, 4), loss_fn=lambda out: out.sum(), time_steps=2)
    assert report.step_time is not None and report.step_time >= 0
    assert calls == ["sync"] * 4


def test_waiting_for_the_device_is_a_no_op_without_an_accelerator() -> None:
    from tightfit import _step

    accelerator = getattr(torch, "accelerator", None)
    if torch.cuda.is_available() or (accelerator is not None and accelerator.is_available()):
        pytest.skip("this machine has an accelerator")
    assert _step._accelerator_sync() is None
    _step.wait_for_device()
