"""Calibration: exact per-module histograms of pre-activations, gradient weighting, fitted tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tightfit.fewbit.calibrate import Calibration, calibrate
from tightfit.fewbit.fit import NormalWeight, fit, table_error
from tightfit.fewbit.lookup import get_table


def _model():
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def test_histograms_are_exact_counts():
    model = _model()
    batches = [torch.randn(32, 8) * 3 for _ in range(3)]
    seen: dict[str, list[torch.Tensor]] = {"1": [], "3": []}
    hs = [model[i].register_forward_hook(lambda m, a, o, k=str(i): seen[k].append(a[0].detach()))
          for i in (1, 3)]
    cal = calibrate(model, batches)
    for h in hs:
        h.remove()
    assert cal.paths == ["1", "3"] and cal.batches == 3
    assert {p: s.name for p, (s, _) in cal.specs.items()} == {"1": "gelu", "3": "tanh"}
    for path, xs in seen.items():
        x = torch.cat([t.reshape(-1) for t in xs])
        h = cal.histograms[path]
        ref = torch.bucketize(x, torch.from_numpy(h.edges).float(), right=False)
        assert np.array_equal(h.counts, np.bincount(ref.numpy(), minlength=h.counts.size))
        assert h.total == x.numel() and h.min == x.min().item() and h.max == x.max().item()
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed


def test_tails_and_nonfinite():
    model = nn.Sequential(nn.SiLU())
    x = torch.tensor([-3000.0, -20.0, 0.5, 1.0, 100.0, 5e7, float("nan"), float("inf")])
    cal = calibrate(model, [x])
    h = cal.histograms["0"]
    assert h.nonfinite == 2 and h.total == 6
    assert h.counts[0] == 0 and h.counts[-1] == 1  # 5e7 is beyond the last tail edge (16*2^20)
    w = cal.weight("0")
    assert w.lo == -3000.0 and w.hi == 5e7


def test_calibrated_weight_fits_the_real_distribution():
    """Pre-activations ~ N(1, 0.5²): the calibrated table is near that distribution's optimum and beats
    the shipped N(0, 1) table on it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.GELU())
    cal = calibrate(model, [torch.randn(200_000) * 0.5 + 1.0 for _ in range(2)])
    t = cal.fit("0", 2)
    target = NormalWeight(mean=1.0, std=0.5)
    ideal = fit("gelu", 2, weight=target)
    e_cal = table_error(torch.nn.functional.gelu, t.borders, t.levels, target)
    e_shipped = table_error(torch.nn.functional.gelu, get_table("gelu", 2).borders,
                            get_table("gelu", 2).levels, target)
    assert e_cal == pytest.approx(ideal.error, rel=0.02)
    assert e_cal < 0.5 * e_shipped
    assert cal.fit("0", 2).bits == 2
    relu = calibrate(nn.Sequential(nn.ReLU()), [torch.randn(100)])
    assert relu.fit("0", 4).exact


def test_gradient_weighting_and_params_untouched():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
    c = torch.randn(10, 6)
    batches = [torch.randn(10, 4) for _ in range(2)]
    inputs = [model[0](b).detach() for b in batches]
    cal = calibrate(model, batches, loss_fn=lambda y: (y * c).sum())
    assert all(p.grad is None for p in model.parameters())
    h = cal.histograms["1"]
    edges = torch.from_numpy(h.edges).float()
    ref = np.zeros(h.counts.size)
    for x in inputs:  # d loss / d tanh-output = c, whatever x
        idx = torch.bucketize(x.reshape(-1), edges, right=False)
        ref += np.bincount(idx.numpy(), weights=(c.reshape(-1).double() ** 2).numpy(), minlength=ref.size)
    np.testing.assert_allclose(h.grad_sq, ref, rtol=1e-12)
    wg = cal.weight("1", by="grad")
    assert wg.lo >= h.min and wg.hi <= h.max
    t = cal.fit("1", 2, by="grad")
    # JSON round trip gives the same tables
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again.paths == cal.paths and again.batches == 2
    u = again.fit("1", 2, by="grad")
    assert torch.equal(u.borders, t.borders) and torch.equal(u.levels, t.levels)


def test_bad_input():
    with pytest.raises(ValueError, match="no activation module"):
        calibrate(nn.Linear(2, 2), [torch.randn(1, 2)])
    with pytest.raises(ValueError, match="no batches"):
        calibrate(_model(), [])
    with pytest.raises(TypeError, match="nn.Module"):
        calibrate(lambda x: x, [torch.randn(2)])
    cal = calibrate(_model(), [torch.randn(2, 8)], filter_fn=lambda m, p: isinstance(m, nn.GELU))
    assert cal.paths == ["1"]
    with pytest.raises(ValueError, match="no gradients"):
        cal.weight("1", by="grad")
    with pytest.raises(KeyError, match="calibrated paths"):
        cal.weight("3")
    with pytest.raises(ValueError, match="by must be"):
        cal.weight("1", by="output")


def test_far_outliers_do_not_spoil_the_fit():
    """A few pre-activations at 1e4..1e6 stretch the range 10^5-fold; the grid keeps its resolution
    where the mass is, so the table stays near the outlier-free optimum."""
    torch.manual_seed(0)
    x = torch.randn(200_000) * 0.5 + 1.0
    x[:3] = torch.tensor([1e4, -2e4, 1e6])
    cal = calibrate(nn.Sequential(nn.GELU()), [x])
    t = cal.fit("0", 3)
    target = NormalWeight(mean=1.0, std=0.5)
    ideal = fit("gelu", 3, weight=target)
    assert table_error(torch.nn.functional.gelu, t.borders, t.levels, target) == pytest.approx(
        ideal.error, rel=0.05
    )


def test_public_name_is_the_function_whatever_was_imported_first():
    import importlib

    import tightfit

    mod = importlib.import_module("tightfit.fewbit.calibrate")
    assert tightfit.fewbit.calibrate is mod.calibrate
    assert tightfit.fewbit.calibrate(nn.Sequential(nn.Tanh()), [torch.randn(5)]).paths == ["0"]
