"""Fused few-bit SwiGLU/GEGLU: identical forward, exact formula backward, honest saved bytes."""

import pytest
import torch
import torch.nn.functional as F

from tightfit.fewbit import gated
from tightfit.fewbit.lookup import get_table
from tightfit.memory import SavedTensorCounter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_forward_identical_backward_formula(kind, dtype):
    name, f = ("silu", F.silu) if kind == "swiglu" else ("gelu", F.gelu)
    a = (torch.randn(5, 33) * 2).to(dtype).requires_grad_(True)
    b = torch.randn(5, 33).to(dtype).requires_grad_(True)
    h = getattr(gated, kind)(a, b, bits=3)
    assert torch.equal(h, f(a.detach()) * b.detach())
    g = torch.randn_like(h)
    h.backward(g)
    t = get_table(name, 3)
    q = t.levels.to(dtype)[t.encode(a.detach())]
    assert torch.equal(a.grad, q * (g * b.detach()))
    assert torch.equal(b.grad, g * f(a.detach()))


def test_saved_bytes():
    n, bits = 4 * 257, 2
    a = torch.randn(4, 257, requires_grad=True)
    b = torch.randn(4, 257, requires_grad=True)
    t = get_table("silu", bits)
    with SavedTensorCounter(exclude=[t.levels]) as c:
        gated.swiglu(a, b, bits=bits)
    want = gated.gated_saved_bytes(n, bits)
    assert c.bytes - 8 * t.levels.numel() <= want["fewbit"] <= c.bytes  # + the levels on this dtype (tiny)
    with SavedTensorCounter() as c_torch:
        F.silu(a) * b
    assert c_torch.bytes == want["torch_unfused"]


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        gated.swiglu(torch.randn(3, 4), torch.randn(4, 3))
