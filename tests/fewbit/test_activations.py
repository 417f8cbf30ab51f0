"""The activation registry: forwards identical to torch / transformers, module recognition, parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tightfit.fewbit.activations import ACTIVATIONS, KINDS, spec_for_module, spec_for_name

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _inputs(dtype):
    x = torch.randn(257, dtype=torch.float64) * 4
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0, -3.0, 6.0, 0.5, -0.5, 20.0, -20.0, 10.0])
    return torch.cat([x, special.double()]).to(dtype)


TORCH_MODULES = [
    nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.2), nn.Threshold(0.1, 5.0), nn.Hardtanh(-0.3, 0.7),
    nn.Hardsigmoid(), nn.Hardswish(), nn.Hardshrink(0.3), nn.Softshrink(0.7), nn.Tanhshrink(),
    nn.ELU(2.0), nn.CELU(0.5), nn.SELU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Mish(),
    nn.Sigmoid(), nn.LogSigmoid(), nn.Tanh(), nn.Softplus(2.0, 5.0), nn.Softsign(),
]


@pytest.mark.parametrize("module", TORCH_MODULES, ids=lambda m: repr(m))
def test_torch_modules_recognised_and_forward_identical(module):
    spec, params = spec_for_module(module)
    for dtype in DTYPES:
        x = _inputs(dtype)
        assert torch.equal(spec.fn(x, **params), module(x)), (spec.name, dtype)
        assert torch.equal(spec(x, **params), module(x))


def test_every_torch_pointwise_activation_is_covered():
    names = ["ReLU", "ReLU6", "LeakyReLU", "Threshold", "Hardtanh", "Hardsigmoid", "Hardswish",
             "Hardshrink", "Softshrink", "Tanhshrink", "ELU", "CELU", "SELU", "GELU", "SiLU", "Mish",
             "Sigmoid", "LogSigmoid", "Tanh", "Softplus", "Softsign"]
    covered = {c for s in ACTIVATIONS.values() for c in s.torch_modules}
    assert {getattr(nn, n) for n in names} <= covered
    assert {s.kind for s in ACTIVATIONS.values()} == set(KINDS)


def test_module_parameters_are_read():
    spec, p = spec_for_module(nn.Softplus(beta=2.0, threshold=5.0))
    assert spec.name == "softplus" and p == {"beta": 2.0, "threshold": 5.0}
    spec, p = spec_for_module(nn.Hardtanh(-2.0, 3.0))
    assert spec.name == "hardtanh" and p == {"min_val": -2.0, "max_val": 3.0}
    assert spec_for_module(nn.GELU(approximate="tanh"))[0].name == "gelu_tanh"
    assert spec_for_module(nn.ReLU6())[0].name == "relu6"  # a Hardtanh subclass, recognised as itself

    class MyGELU(nn.GELU):
        def forward(self, x):
            return x

    assert spec_for_module(MyGELU()) is None  # may compute something else
    assert spec_for_module(nn.Linear(2, 2)) is None
    assert spec_for_module(nn.PReLU()) is None


def test_hf_activations_identical():
    acts = pytest.importorskip("transformers.activations")
    unsupported = {"linear", "prelu", "xielu"}
    x32 = _inputs(torch.float32)
    for key in acts.ACT2CLS:
        if key in unsupported:
            with pytest.raises(ValueError, match="not supported"):
                spec_for_name(key)
            continue
        module = acts.ACT2FN[key]
        by_module = spec_for_module(module)
        assert by_module is not None, key
        spec, params = by_module
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            x = x32.to(dtype)
            assert torch.equal(spec.fn(x, **params), module(x)), (key, spec.name, dtype)
        named = spec_for_name(key)
        assert named.table_name == spec.table_name, key
    # the python fallbacks are recognised as what they compute
    assert spec_for_module(acts.GELUActivation(use_gelu_python=True))[0].name == "gelu_python"
    assert spec_for_module(acts.GELUTanh(use_gelu_tanh_python=True))[0].name == "gelu_python_tanh"
    spec, p = spec_for_module(acts.ClippedGELUActivation(-3.0, 2.0))
    assert spec.name == "clipped_gelu" and p == {"min": -3.0, "max": 2.0}


def test_kinds_and_breaks():
    x = _inputs(torch.float64)
    for spec in ACTIVATIONS.values():
        d = spec.derivative(x)
        if spec.kind in ("step", "band"):
            assert d.unique().numel() <= 2, spec.name  # bands: 3 pieces, 2 distinct slopes
            assert len(spec.break_points()) == (1 if spec.kind == "step" else 2)
    # declared jumps of smooth functions are real jumps of f'
    for name, params in [("elu", {"alpha": 2.0}), ("selu", {}), ("hardswish", {})]:
        spec = ACTIVATIONS[name]
        for b in spec.break_points(**params):
            eps = torch.tensor([b - 1e-9, b + 1e-9], dtype=torch.float64)
            lo, hi = spec.derivative(eps, **params).tolist()
            assert abs(hi - lo) > 0.1, (name, b)
    # ClippedGELU's kink sits where gelu reaches the clip value
    b = ACTIVATIONS["clipped_gelu"].break_points(min=-1.0, max=1.5)
    assert len(b) == 1 and torch.nn.functional.gelu(torch.tensor(b[0], dtype=torch.float64)).item() == (
        pytest.approx(1.5, abs=1e-12)
    )


def test_names_and_errors():
    assert spec_for_name("swish") is ACTIVATIONS["silu"]
    assert spec_for_name("gelu_pytorch_tanh") is ACTIVATIONS["gelu_tanh"]
    assert spec_for_name("GELU") is ACTIVATIONS["gelu"]
    assert spec_for_name("gelu_10") is ACTIVATIONS["clipped_gelu"]
    with pytest.raises(ValueError, match="unknown activation 'gelux'.*known names"):
        spec_for_name("gelux")
    with pytest.raises(TypeError):
        spec_for_name(3)
    with pytest.raises(ValueError, match="no parameter.*valid parameters: alpha"):
        ACTIVATIONS["elu"].params(beta=1.0)
    with pytest.raises(ValueError, match="approximate"):
        m = nn.GELU()
        m.approximate = "cubic"
        spec_for_module(m)
    assert ACTIVATIONS["leaky_relu"].params(negative_slope=0.3) == {"negative_slope": 0.3}
