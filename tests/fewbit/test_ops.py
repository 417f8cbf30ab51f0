"""The few-bit op: forward identical to torch, backward == table gather, exact saved bytes, transforms."""

import functools

import pytest
import torch

from tightfit.fewbit import ops
from tightfit.fewbit.activations import ACTIVATIONS
from tightfit.fewbit.functional import activation
from tightfit.fewbit.lookup import get_table
from tightfit.memory import SavedTensorCounter

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
NAMES = sorted(ACTIVATIONS)


def _inputs(dtype, table, n=301):
    x = (torch.randn(n, dtype=torch.float64) * 3).to(dtype)
    b = table.borders.to(dtype)
    x[: b.numel()] = b  # exact ties at every border
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_forward_identical_and_backward_is_table_gather(name, dtype):
    spec = ACTIVATIONS[name]
    bits = 3
    table = get_table(name, bits)
    x = _inputs(dtype, table).requires_grad_(True)
    y = activation(x, name, bits)
    want = spec.fn(x.detach(), **spec.params())
    assert torch.equal(y, want)  # bit-identical forward (NaN-free inputs)
    for cls in spec.torch_modules:  # ... and identical to the torch module itself
        if cls is torch.nn.GELU:
            mod = cls(approximate="tanh" if name == "gelu_tanh" else "none")
        elif cls is torch.nn.Threshold:
            mod = cls(0.0, 0.0)
        else:
            mod = cls()
        assert torch.equal(y, mod(x.detach()))
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    y.backward(g)
    assert x.grad.dtype == dtype
    assert torch.equal(x.grad, table.levels.to(dtype)[table.encode(x.detach())] * g)
    if table.exact and dtype in (torch.float32, torch.float64):  # exact tables give torch's own gradient
        xx = x.detach().clone().requires_grad_(True)
        spec.fn(xx, **spec.params()).backward(g)
        assert torch.equal(x.grad, xx.grad)


def test_saved_bytes_exact():
    """ceil(n*bits/8) bytes for every bits and odd lengths: per call (hooks), and in total (the ruler)."""
    key = ops.register_forward("test-gelu", torch.nn.functional.gelu)
    cases = [(bits, n) for bits in range(1, 9) for n in (1, 7, 13, 1001)]
    tables = {
        bits: (
            torch.linspace(-2, 2, (1 << bits) - 1, dtype=torch.float64),
            torch.linspace(0, 1, 1 << bits, dtype=torch.float64),
        )
        for bits in range(1, 9)
    }
    outs = []
    for bits, n in cases:  # per call: the innermost saved-tensor hook sees exactly what is kept
        borders, levels = tables[bits]
        x = torch.randn(n, requires_grad=True)
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, seen=seen: seen.append(t) or t, lambda t: t):
            outs.append(ops.fewbit_apply(x, key, borders, levels, bits))
        packed = [t for t in seen if t is not levels]
        assert [t.untyped_storage().nbytes() for t in packed] == [(n * bits + 7) // 8], (bits, n)
        assert packed[0].dtype == torch.uint8
    with SavedTensorCounter(exclude=[lv for _, lv in tables.values()]) as total:  # the ruler, all at once
        for bits, n in cases:
            borders, levels = tables[bits]
            outs.append(ops.fewbit_apply(torch.randn(n, requires_grad=True), key, borders, levels, bits))
    assert total.bytes == sum((n * bits + 7) // 8 for bits, n in cases)
    with SavedTensorCounter() as c_torch:
        torch.nn.functional.gelu(torch.randn(1001, requires_grad=True))
    assert c_torch.bytes == 4 * 1001  # what torch keeps: the fp32 input
    sum(o.sum() for o in outs).backward()


def test_non_contiguous_input():
    table = get_table("silu", 2)
    base = torch.randn(6, 10, 4, requires_grad=True)
    x = base.transpose(0, 2)[:, 1::3]
    y = activation(x, "silu", 2)
    assert torch.equal(y, torch.nn.functional.silu(x.detach()))
    g = torch.randn(y.shape)
    (gx,) = torch.autograd.grad(y, base, g)
    want = torch.zeros_like(base)
    want.transpose(0, 2)[:, 1::3] = table.levels.float()[table.encode(x.detach())] * g
    assert torch.equal(gx, want)


def test_no_autograd_no_codes():
    x = torch.randn(10)
    with SavedTensorCounter() as c:
        y = activation(x, "gelu", 2)
    assert c.bytes == 0 and torch.equal(y, torch.nn.functional.gelu(x))


def test_double_backward_raises():
    x = torch.randn(10, requires_grad=True)
    y = activation(x, "gelu", 2)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    f = functools.partial(activation, name="tanh", bits=2)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.func.grad(torch.func.grad(lambda t: f(t).sum()))(torch.tensor(0.3))


def test_func_grad_matches_autograd():
    table = get_table("gelu", 2)
    x = torch.randn(50)
    gx = torch.func.grad(lambda t: activation(t, "gelu", 2).sum())(x)
    assert torch.equal(gx, table.levels.float()[table.encode(x)])


def test_autocast_bf16():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        y = activation(h, "gelu", 2)
    assert h.dtype == y.dtype == torch.bfloat16
    assert torch.equal(y, torch.nn.functional.gelu(h.detach()))
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


def test_bad_input():
    with pytest.raises(TypeError, match="floating-point"):
        activation(torch.arange(4), "gelu", 2)
    with pytest.raises(ValueError, match="1..8"):
        activation(torch.randn(3, requires_grad=True), "gelu", 9)


def test_device_constants_are_copied_once_and_reused(monkeypatch):
    """A forward on a device other than the constants' (a GPU in practice; the meta device here) copies
    each table constant there once: later calls reuse the same tensors, so they make no host-to-device
    copy. Results on the CPU are those of the table gather, with the same constants."""
    import tightfit
    from tightfit.fewbit import gated

    copies = []
    real = ops._copy_to
    monkeypatch.setattr(ops, "_copy_to", lambda t, d: copies.append((t.dtype, str(d))) or real(t, d))
    mod = tightfit.nn.GELU(bits=3)
    meta = torch.device("meta")
    for dtype in (torch.float32, torch.bfloat16):
        borders, levels = mod._consts[dtype]
        first = (ops.on_device(borders, meta), ops.on_device(levels, meta))
        for _ in range(3):
            x = torch.randn(5, 7, device=meta, dtype=dtype, requires_grad=True)
            y = mod(x)
            assert y.device == meta and y.shape == x.shape
            assert ops.on_device(borders, meta) is first[0] and ops.on_device(levels, meta) is first[1]
    assert len(copies) == 4  # borders and levels, per dtype, once
    # the functional and gated forms (constants from the registry, or from table=) reuse theirs too
    t = get_table("silu", 2)
    a = torch.randn(4, device=meta, requires_grad=True)
    for _ in range(3):
        tightfit.functional.silu(a, bits=2)
        gated.swiglu(a, torch.randn(4, device=meta), bits=2)
        gated.swiglu(a, torch.randn(4, device=meta), table=t)
    assert len(copies) == 4 + 2 + 2
    assert ops.cached_table_tensors(t) is ops.cached_table_tensors(t)
    # on the CPU nothing is copied and the backward is the table gather
    x = torch.randn(301, requires_grad=True)
    mod(x).backward(torch.ones(301))
    g = get_table("gelu", 3)
    assert torch.equal(x.grad, g.levels.float()[g.encode(x.detach())]) and len(copies) == 8


def test_module_built_under_inference_mode_still_trains():
    """Table constants are normal tensors even when made under inference mode (autograd saves them)."""
    import tightfit

    with torch.inference_mode():
        mod = tightfit.nn.SiLU(bits=2)
    x = torch.randn(33, requires_grad=True)
    mod(x).backward(torch.ones(33))
    t = get_table("silu", 2)
    assert torch.equal(x.grad, t.levels.float()[t.encode(x.detach())])
