"""Drop-in modules: torch.nn names and signatures, identical forward, table backward, no in-place."""

import copy
import inspect
import pickle

import pytest
import torch

import tightfit
from tightfit.fewbit import functional as FF
from tightfit.fewbit import modules as M
from tightfit.fewbit.activations import ACTIVATIONS

TORCH_NAMES = [n for n in M.__all__ if n != "FewBitActivation"]
ARGS = {"Threshold": (0.1, 20.0)}


def test_every_torch_registry_activation_has_a_dropin():
    torch_classes = {cls.__name__ for spec in ACTIVATIONS.values() for cls in spec.torch_modules}
    assert torch_classes <= set(TORCH_NAMES)


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_dropin_matches_torch(name):
    ours_cls = getattr(tightfit.nn, name)  # resolved lazily through tightfit.nn
    torch_cls = getattr(torch.nn, name)
    # torch's parameters are all accepted, in the same order, plus keyword-only bits
    ours_sig = inspect.signature(ours_cls.__init__).parameters
    torch_init = torch_cls.__init__
    torch_sig = {} if torch_init is torch.nn.Module.__init__ else inspect.signature(torch_init).parameters
    assert [p for p in torch_sig if p != "self"] == [
        p for p, v in ours_sig.items() if p != "self" and v.kind != v.KEYWORD_ONLY
    ]
    assert ours_sig["bits"].kind == inspect.Parameter.KEYWORD_ONLY
    args = ARGS.get(name, ())
    ours, ref = ours_cls(*args, bits=3), torch_cls(*args)
    assert "bits=3" in repr(ours)
    x = torch.randn(3, 41, dtype=torch.float64) * 3
    x[1, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    xa = x.clone().requires_grad_(True)
    y = ours(xa)
    torch.testing.assert_close(y, ref(x), rtol=0, atol=0, equal_nan=True)
    grad = torch.randn(y.shape, dtype=y.dtype)
    y.backward(grad)
    t = ours.table
    assert torch.equal(xa.grad, t.levels[t.encode(x)] * grad)
    if t.exact:  # piecewise linear: torch's own gradient, at NaN and the infinities too
        xr = x.clone().requires_grad_(True)
        ref(xr).backward(grad)
        torch.testing.assert_close(xa.grad, xr.grad, rtol=0, atol=0, equal_nan=True)
    assert ours.state_dict() == {} and list(ours.buffers()) == []


def test_inplace_never_modifies_input():
    x = torch.randn(50)
    keep = x.clone()
    y = tightfit.nn.ReLU(inplace=True)(x)
    assert torch.equal(x, keep) and y.data_ptr() != x.data_ptr()
    y = tightfit.nn.SiLU(inplace=True)(x.requires_grad_(True))
    assert torch.equal(x.detach(), keep)


def test_gelu_variants_and_generic():
    g = tightfit.nn.GELU("tanh", bits=2)
    x = torch.randn(30)
    assert torch.equal(g(x), torch.nn.GELU("tanh")(x))
    assert "approximate='tanh'" in repr(g) and "bits=2" in repr(g)
    new = M.FewBitActivation("gelu_new", bits=4)
    assert "gelu_new" in repr(new) and "bits=4" in repr(new)
    with pytest.raises(ValueError, match="approximate"):
        tightfit.nn.GELU("fast")
    with pytest.raises(ValueError, match="unknown activation"):
        M.FewBitActivation("gelu_news")


def test_exact_tables_shown_and_bits_clamped():
    r = tightfit.nn.ReLU(bits=4)
    assert r.table.exact and r.table.bits == 1 and "exact 1-bit" in repr(r)
    h = tightfit.nn.Hardtanh(-2.0, 2.0, bits=1)
    assert h.table.exact and h.table.bits == 2


def test_copy_and_pickle():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), tightfit.nn.GELU(bits=2))
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        x = torch.randn(2, 4)
        assert torch.equal(clone(x), m(x))


def test_functional_forms():
    x = torch.randn(64, requires_grad=True)
    assert torch.equal(FF.gelu(x, bits=2), torch.nn.functional.gelu(x))
    assert torch.equal(FF.leaky_relu(x, 0.2), torch.nn.functional.leaky_relu(x, 0.2))
    assert torch.equal(tightfit.functional.silu(x, bits=3), torch.nn.functional.silu(x))
    for name in FF.__all__:
        assert callable(getattr(tightfit.functional, name))
