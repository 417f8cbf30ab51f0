"""convert_ with Sketch: module surgery, shared inputs (ruler-checked savings), kept-alive inputs, Conv1D,
validation before mutation, config serialisation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tightfit
from tightfit.memory import LiveTracker, SavedTensorCounter
from tightfit.sketch.config import Sketch
from tightfit.sketch.modules import RandomizedConv1D, RandomizedLinear


class Block(nn.Module):
    """q/k/v read one LayerNorm output (shared input); g's input is also saved by a multiply (kept alive)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc, self.proj, self.g = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        a = F.softmax(self.q(h) @ self.k(h).transpose(-1, -2), -1) @ self.v(h)
        x = x + self.o(a)
        x = x + self.proj(F.gelu(self.fc(x)))
        return x + self.g(x) * x


def _loss(y: torch.Tensor) -> torch.Tensor:
    return y.square().mean()


def test_convert_keeps_parameters_state_dict_and_forward() -> None:
    model = nn.Sequential(Block(), Block())
    before = copy.deepcopy(model)
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    report = tightfit.convert_(model, Sketch(ratio=0.25, sketch="rows"))
    assert len(report) == 14 and all(isinstance(model[i].q, RandomizedLinear) for i in range(2))
    assert list(model.state_dict()) == keys
    assert all(p is params[name] for name, p in model.named_parameters())  # shared, not copied
    x = torch.randn(2, 8, 16)
    assert torch.equal(model(x), before(x))
    assert "predicted saving" in str(report)
    again = tightfit.convert_(model, Sketch(ratio=0.25))
    assert len(again) == 0 and all("already" in why for _, why in again.skipped)


def test_filter_fn_limits_conversion() -> None:
    model = Block()
    only_mlp = lambda m, path: path in ("fc", "proj")  # noqa: E731
    tightfit.convert_(model, Sketch(ratio=0.5), filter_fn=only_mlp)
    assert isinstance(model.fc, RandomizedLinear) and isinstance(model.proj, RandomizedLinear)
    assert type(model.q) is nn.Linear


def _saved(model: nn.Module, x: torch.Tensor) -> int:
    with SavedTensorCounter(exclude=[model, x]) as counter:
        model(x)
    return counter.bytes


def _peak(model: nn.Module, x: torch.Tensor) -> int:
    with LiveTracker(track=[model, x]) as tracker:
        _loss(model(x)).backward()
    for p in model.parameters():
        p.grad = None
    return tracker.peak


def test_shared_input_saves_what_it_claims() -> None:
    """q/k/v share one sketch; the predicted saving equals the counted one; the measured peak goes down."""
    model = nn.Sequential(Block())
    x = torch.randn(4, 32, 16)
    saved_before = _saved(model, x)
    peak_before = _peak(model, x)
    report = tightfit.convert_(model, Sketch(ratio=0.25, sketch="gaussian"), example=x, loss_fn=_loss)
    assert ("0.g", "its input is also saved for backward by another op: a sketch would free nothing") in (
        report.skipped
    )
    assert type(model[0].g) is nn.Linear
    predicted = report.metrics["predicted_saved_bytes"]
    saved_after = _saved(model, x)
    assert saved_before - saved_after == predicted > 0
    # q/k/v: one sketch (k x d) for the shared LayerNorm output, as counted above
    n, k, d = 128, 32, 16
    assert predicted == 3 * (n * d * 4 - (k * d * 4 + 8)) + (n * 4 * d * 4 - (k * 4 * d * 4 + 8))
    share = model[0].q.share
    assert share is model[0].k.share and share.hits >= 2
    peak_after = _peak(model, x)
    assert report.metrics["peak_before"] == peak_before and report.metrics["peak_after"] == peak_after
    assert peak_after < peak_before
    assert "measured peak" in str(report)


def test_separate_sketches_for_shared_input_cost_more() -> None:
    x = torch.randn(4, 32, 16)
    shared, separate = nn.Sequential(Block()), nn.Sequential(Block())
    tightfit.convert_(shared, Sketch(ratio=0.25), example=x, loss_fn=_loss)
    tightfit.convert_(separate, Sketch(ratio=0.25, shared="separate"), example=x, loss_fn=_loss)
    # two extra sketches of the 128 x 16 LayerNorm output (32 rows each, fp32) plus their seeds
    assert _saved(separate, x) - _saved(shared, x) == 2 * (32 * 16 * 4 + 8)


def test_validates_before_mutating() -> None:
    model = Block()
    x = torch.randn(2, 8, 16)  # N = 16 tokens
    with pytest.raises(ValueError, match="k=100 is larger than the number of tokens N=16"):
        tightfit.convert_(model, Sketch(k=100), example=x, loss_fn=_loss)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    with pytest.raises(TypeError, match="valid configs"):
        tightfit.convert_(model, {"ratio": 0.5})


def test_gpt2_conv1d_converted_with_its_layout() -> None:
    from transformers.pytorch_utils import Conv1D

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc, self.c_proj = Conv1D(32, 8), Conv1D(8, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c_proj(F.gelu(self.c_fc(x)))

    model = MLP()
    ref = copy.deepcopy(model)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    report = tightfit.convert_(model, Sketch(ratio=0.5))
    assert len(report) == 2 and isinstance(model.c_fc, RandomizedConv1D)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in keys.items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    x = torch.randn(3, 10, 8, requires_grad=True)
    y, y_ref = model(x), ref(x)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(gx, gx_ref)
    with SavedTensorCounter(exclude=[model, x]) as c:
        model.c_fc(x)
    assert c.bytes == 15 * 8 * 4 + 8  # k = 15 of 30 tokens, 8 input features


def test_config_roundtrip_and_errors() -> None:
    cfg = Sketch(ratio=0.2, sketch="rows")
    assert Sketch.from_dict(cfg.to_dict()) == cfg
    assert Sketch.from_dict(Sketch(k=64).to_dict()) == Sketch(k=64)
    assert Sketch().ratio == 0.5
    with pytest.raises(ValueError, match="ratio"):
        Sketch(ratio=1.5)
    with pytest.raises(ValueError, match="unknown sketch"):
        Sketch(sketch="dct")
    with pytest.raises(ValueError, match="shared"):
        Sketch(shared="maybe")
    with pytest.raises(ValueError, match="unknown Sketch fields"):
        Sketch.from_dict({"ratio": 0.5, "bits": 2})


def test_frozen_layers_and_multihead_attention_are_skipped_with_reasons():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    model[0].weight.requires_grad_(False)
    mha = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    report = tightfit.convert_(torch.nn.ModuleDict({"mlp": model, "enc": mha}), tightfit.Sketch(ratio=0.5))
    reasons = dict(report.skipped)
    assert "frozen weight" in reasons["mlp.0"]
    assert "never called" in reasons["enc.self_attn"]
    assert {p for p, _, _ in report.converted} == {"mlp.1", "enc.linear1", "enc.linear2"}
