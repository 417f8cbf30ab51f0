"""tightfit.sketch.variance: SGD variance vs brute force, closed forms vs Monte Carlo, recommendation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tightfit.sketch.diagnostics import variance
from tightfit.sketch.modules import RandomizedLinear


class TwoLayer(nn.Module):
    def __init__(self, lin: type = nn.Linear, **kw) -> None:  # noqa: ANN003
        super().__init__()
        self.a = lin(6, 12, **kw)
        self.b = lin(12, 3, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _loss(y: torch.Tensor) -> torch.Tensor:
    return y.square().mean()


def test_sgd_variance_matches_per_sample_gradients() -> None:
    model = TwoLayer()
    x = torch.randn(5, 7, 6)  # 5 samples of 7 tokens
    report = variance(model, [x], _loss, draws=0)
    # brute force: a_s = the batch-gradient contribution of sample s (loss is a mean over the batch)
    contrib = []
    for s in range(5):
        model.zero_grad()
        (model(x[s : s + 1]).square().sum() / 105).backward()  # 105 = outputs in the batch
        contrib.append(model.b.weight.grad.clone())
    a = torch.stack(contrib).double()
    expected = 5 / 4 * ((a - a.mean(0)) ** 2).sum().item()
    lv = next(lv for lv in report.layers if lv.path == "b")
    assert lv.sgd == pytest.approx(expected, rel=1e-6)
    assert lv.samples == 5 and lv.tokens == 35


@pytest.mark.parametrize("sketch", ["gaussian", "rademacher", "rows", "norm_rows"])
def test_closed_form_matches_monte_carlo_on_converted_layers(sketch: str) -> None:
    model = TwoLayer(RandomizedLinear, ratio=0.3, sketch=sketch)
    batches = [torch.randn(4, 10, 6) for _ in range(2)]
    report = variance(model, batches, _loss, draws=300)
    for lv in report.layers:
        assert lv.ratio == 0.3 and lv.sketch == sketch
        assert lv.measured == pytest.approx(lv.sketched, rel=0.2)
        assert lv.relative == pytest.approx(lv.sketched / lv.sgd)


def test_recommendation_is_smallest_ratio_under_tolerance() -> None:
    model = TwoLayer()
    batches = [torch.randn(8, 16, 6) for _ in range(2)]
    grads = [p.grad for p in model.parameters()]
    state = torch.get_rng_state()
    loose = variance(model, batches, _loss, tolerance=100.0, sketch="rows")
    tight = variance(model, batches, _loss, tolerance=0.2, sketch="rows")
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert [p.grad for p in model.parameters()] == grads  # no .grad written
    for lo, ti in zip(loose.layers, tight.layers):
        for lv, tol in ((lo, 100.0), (ti, 0.2)):
            ok = [r for r, v in lv.curve.items() if v <= tol * lv.sgd]
            assert lv.recommended == min(ok)
            assert lv.curve[1.0] == 0  # keeping every row is exact
        assert lo.recommended <= ti.recommended
        values = [lo.curve[r] for r in sorted(lo.curve)]
        assert values == sorted(values, reverse=True)  # fewer rows, more variance
    assert "recommend" in str(tight) and tight.to_dict()["layers"][0]["path"] == "a"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        variance(TwoLayer(), [torch.randn(2, 6)], _loss, tolerance=0)
    with pytest.raises(ValueError, match="ratios"):
        variance(TwoLayer(), [torch.randn(2, 6)], _loss, ratios=[0.0, 0.5])
    with pytest.raises(ValueError, match="empty"):
        variance(TwoLayer(), [], _loss)
    with pytest.raises(ValueError, match="no linear layers"):
        variance(nn.Sequential(nn.Tanh()), [torch.randn(2, 6)], lambda y: y.sum())


def test_public_name() -> None:
    import tightfit

    report = tightfit.sketch.variance(TwoLayer(), [torch.randn(4, 6)], _loss, draws=0)
    assert [lv.path for lv in report.layers] == ["a", "b"]
