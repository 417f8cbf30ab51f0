"""The fused SiLU forward (silu(x) and its codes in one pass): bit-identical to torch, codes as `encode`."""

import pytest
import torch
import torch.nn.functional as F

import tightfit
from tightfit.fewbit import _native, codec
from tightfit.fewbit.gated import swiglu

FUSED = _native.silu_fused_available()
needs_fused = pytest.mark.skipif(
    not FUSED, reason="fused SiLU needs the native kernels, AVX-512 and torch's Sleef (not on this CPU)"
)
# torch splits pointwise loops into one range per thread above 32768 elements; each range has a scalar
# tail that rounds differently from the vector body, so the lengths straddle those boundaries
LENGTHS = [1, 15, 16, 33, 64, 65, 1000, 32767, 32768, 32769, 3 * 32768 + 45, 400_003]


def _inputs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))
    for start, value in enumerate((float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 88.7, -104.0)):
        x[start :: 89 + 2 * start] = value
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@needs_fused
@pytest.mark.parametrize("threads", [1, 2])
def test_silu_encode_matches_torch_and_encode(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i, n in enumerate(LENGTHS):
            x = _inputs(n, seed=i)
            for bits in range(1, 9):
                g = torch.Generator().manual_seed(100 * i + bits)
                k = torch.randint(1, 1 << bits, (), generator=g).item()  # short tables too
                borders = torch.sort(torch.randn(k, generator=g))[0]
                cmp = codec.compare_borders(borders, x.dtype, False)
                y, packed = _native.silu_encode(x, cmp, bits, nan_code=k // 2)
                assert _same(y, F.silu(x)), (n, bits)
                assert torch.equal(packed, _native.encode(x, cmp, bits, nan_code=k // 2)), (n, bits)
                if n <= 1000:
                    ref = codec.encode_reference(x, borders, bits, False, nan_code=k // 2)
                    assert torch.equal(packed, ref), (n, bits)
    finally:
        torch.set_num_threads(old)


@needs_fused
def test_module_uses_fused_path_and_stays_exact(monkeypatch):
    calls = []
    real = _native.silu_encode
    monkeypatch.setattr(_native, "silu_encode", lambda *a: calls.append(1) or real(*a))
    m = tightfit.nn.SiLU(bits=3)
    x = _inputs(103 * 971, seed=7).clamp(-30, 30).reshape(103, 971).requires_grad_()
    y = m(x)
    assert calls, "SiLU(bits=3) did not take the fused forward"
    assert _same(y.detach(), F.silu(x.detach()))
    grad = torch.randn_like(y)
    y.backward(grad)
    t = m.table
    assert _same(x.grad, t.levels.float()[t.encode(x.detach())] * grad)
    # SwiGLU's gate goes through it too
    calls.clear()
    a = x.detach().clone().requires_grad_()
    b = torch.randn_like(a)
    assert _same(swiglu(a, b, bits=3).detach(), F.silu(a.detach()) * b)
    assert calls


def test_falls_back_where_unavailable(monkeypatch):
    monkeypatch.setattr(_native, "silu_fused_available", lambda: False)
    x = torch.randn(5000)
    borders = torch.sort(torch.randn(7))[0]
    assert codec.silu_encode(x, borders, 3) is None
    xr = x.clone().requires_grad_()
    y = tightfit.nn.SiLU(bits=3)(xr)
    assert torch.equal(y, F.silu(x))
    # non-contiguous or non-fp32 inputs never take it
    assert codec.silu_encode(x[::2], borders, 3) is None
    assert codec.silu_encode(x.double(), borders, 3) is None
