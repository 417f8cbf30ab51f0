"""Cases for the Triton few-bit kernels under Triton's interpreter (CPU tensors), bit for bit against the
reference codec, and the backend selection with the interpreter on.

Run by `tests/fewbit/test_triton.py` in a subprocess with ``TRITON_INTERPRET=1``: the interpreter must be
on before Triton is first imported (Triton's own library functions, e.g. ``tl.sum``, are decorated at
import), and a test session must not turn Triton's library into interpreted functions for other tests.
"""

from __future__ import annotations

import os
import types
import zlib

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by tests/fewbit/test_triton.py with TRITON_INTERPRET=1", allow_module_level=True)

import tightfit  # noqa: E402
from tightfit.fewbit import _triton as T  # noqa: E402
from tightfit.fewbit import codec, gated  # noqa: E402
from tightfit.fewbit._bitcmp import same_bits  # noqa: E402
from tightfit.fewbit.lookup import get_table  # noqa: E402

assert T.INTERPRET

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = [1, 2, 3, 5, 8]
BIG = 1_000_003
# every dtype and every code width meets the 1,000,003-element length in some family (the interpreter is
# numpy: a full cross product at that length would take minutes)
BIG_CASES = {
    ("smooth", torch.float32, 1), ("gated", torch.bfloat16, 2), ("smooth", torch.float16, 3),
    ("gated", torch.float32, 5), ("smooth", torch.bfloat16, 8), ("piecewise", torch.float16, 2),
}


@pytest.fixture
def triton_backend():
    """Force the Triton backend; count its kernel launches and keep the last packed codes it made."""
    codec.set_backend("triton")
    calls = {"encode": 0, "decode_mul": 0, "fused": 0, "packed": None}
    real = {k: getattr(T, k) for k in ("encode", "decode_mul", "fused_forward_raw")}

    def encode(*a, **k):
        calls["encode"] += 1
        calls["packed"] = real["encode"](*a, **k)
        return calls["packed"]

    def fused(*a, **k):
        calls["fused"] += 1
        y, calls["packed"] = real["fused_forward_raw"](*a, **k)
        return y, calls["packed"]

    def decode_mul(*a, **k):
        calls["decode_mul"] += 1
        return real["decode_mul"](*a, **k)

    T.encode, T.decode_mul, T.fused_forward_raw = encode, decode_mul, fused
    try:
        yield calls
    finally:
        T.encode, T.decode_mul, T.fused_forward_raw = (real[k] for k in real)
        codec.set_backend(None)


def _inputs(n: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Leaf tensors of n elements (fresh random, NaN/inf at the front when they fit), plus for small n a
    non-contiguous view (strided, with a storage offset) of a leaf, with the same count."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * 2.5).to(dtype)
    x[: min(n, 3)] = torch.tensor([float("nan"), float("inf"), -float("inf")])[: min(n, 3)].to(dtype)
    out = [x.requires_grad_(True)]
    if n < 100:
        base = (torch.randn(3, 2 * n, generator=g) * 2.5).to(dtype).requires_grad_(True)
        view = base.t()[::2, 1]
        view.retain_grad()
        assert n == 1 or not view.is_contiguous()
        out.append(view)
    return out


def _check_codes(packed, x, t, dtype):
    """The packed codes the op saved equal the reference codec's (bit matrix; the vectorised torch codec,
    itself tested against it, for the large length)."""
    borders = t.borders_for(dtype)
    want = (codec.encode_reference(x.contiguous(), borders, t.bits, t.right, t.nan_code) if x.numel() < 10_000
            else codec._encode_torch(x, codec.compare_borders(borders, dtype, t.right), t.bits, t.nan_code))
    assert torch.equal(packed, want)


FAMILIES = {  # family -> [(registry name, torch fn, module factory or None for gated)]
    "smooth": [("gelu", F.gelu, lambda b: tightfit.nn.GELU(bits=b)),
               ("silu", F.silu, lambda b: tightfit.nn.SiLU(bits=b))],
    "piecewise": [
        ("leaky_relu", lambda x: F.leaky_relu(x, 0.1), lambda b: tightfit.nn.LeakyReLU(0.1, bits=b)),
        ("hardtanh", F.hardtanh, lambda b: tightfit.nn.Hardtanh(bits=b)),
    ],
    "gated": [("silu", F.silu, None), ("gelu", F.gelu, None)],
}


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_triton_ops_match_reference(family, dtype, bits, triton_backend):
    """Forward identical to torch, packed codes and backward bit-identical to the reference, for lengths
    1, 7 (and 1,000,003 on `BIG_CASES`) and a non-contiguous input, through the public modules."""
    assert codec.backend("cpu") == "triton"
    lengths = [1, 7] + ([BIG] if (family, dtype, bits) in BIG_CASES else [])
    i = (BITS.index(bits) + DTYPES.index(dtype)) % 2  # the family's two functions take turns
    name, fn, module = FAMILIES[family][i]
    params = {"negative_slope": 0.1} if name == "leaky_relu" else {}
    t = get_table(name, bits, **params)
    calls = triton_backend
    T.fused_ok(name, dtype, torch.device("cpu"))  # its one-time check runs the fused kernel: not counted
    for n in lengths:
        for xr in _inputs(n, dtype, seed=zlib.crc32(f"{family}/{bits}/{n}/{i}".encode())):
            x = xr.detach()
            g = torch.randn(x.shape).to(dtype)
            want_q = t.levels.to(dtype)[t.encode(x)]
            calls["packed"] = None
            forwards, backwards = calls["encode"] + calls["fused"], calls["decode_mul"]
            if module is not None:
                y = module(bits)(xr)
                assert calls["encode"] + calls["fused"] == forwards + 1  # this case's codes came from Triton
                _check_codes(calls["packed"], x, t, dtype)
                assert same_bits(y, fn(x))
                y.backward(g)
                assert calls["decode_mul"] == backwards + 1  # this case's backward ran the Triton kernel
                assert same_bits(xr.grad, want_q * g)
            else:
                b = torch.randn(x.shape).to(dtype).requires_grad_(True)
                h = gated.gated(xr, b, name, bits)
                assert calls["encode"] + calls["fused"] == forwards + 1
                _check_codes(calls["packed"], x, t, dtype)
                assert same_bits(h, fn(x) * b.detach())
                h.backward(g)
                assert calls["decode_mul"] == backwards + 1
                assert same_bits(xr.grad, want_q * (g * b.detach()))
                assert same_bits(b.grad, g * fn(x))


def test_codec_every_width_ties_and_scale(triton_backend):
    """Every code width 1..8 (codes straddling bytes), exact ties under mixed >=/> flags, NaN codes,
    and the fused ``grad * scale`` of gated units, against the reference codec."""
    g = torch.Generator().manual_seed(3)
    for bits in range(1, 9):
        k = (1 << bits) - 1 if bits % 2 else max(1, bits - 1)  # full tables and short ones
        borders = torch.sort(torch.randn(k, dtype=torch.float64, generator=g) * 1.5).values
        right = [bool(i % 2) for i in range(k)]
        for dtype in DTYPES:
            x = (torch.randn(517, generator=g) * 2).to(dtype)
            x[:k] = borders[:517].to(dtype)
            x[300:303] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)
            x[306:309] = torch.tensor([1e-39, -1e-40, 3e-8]).to(dtype)  # subnormal inputs
            nan_code = (k + 1) // 2
            want = codec.encode_reference(x, borders, bits, right, nan_code)
            assert torch.equal(codec.encode(x, borders, bits, right, nan_code), want), (bits, dtype)
            levels = torch.randn(1 << bits, dtype=torch.float64, generator=g)
            grad = torch.randn(517, generator=g).to(dtype)
            scale = (torch.randn(517, generator=g) * 3).to(dtype)
            # subnormal inputs, gradients and products (a flush to zero, or a wrong widening, shows here)
            grad[303:306] = torch.tensor([1e-38, -3e-39, 6e-5]).to(dtype)
            scale[303:306] = torch.tensor([0.01, 0.3, 1e-3]).to(dtype)
            assert torch.equal(codec.decode_mul(want, levels, grad, bits),
                               codec.decode_mul_reference(want, levels, grad, bits))
            assert torch.equal(codec.decode_mul(want, levels, grad, bits, scale),
                               codec.decode_mul_reference(want, levels, grad * scale, bits))


def test_mismatched_scale_is_the_same_error_as_on_the_other_backends(triton_backend):
    """A scale of another shape or dtype raises the codec's ValueError before any kernel runs, as on the
    torch and native backends (tests/fewbit/test_codec.py), instead of broadcasting on one backend only."""
    packed = codec.encode(torch.randn(6), torch.tensor([0.0]), 1)
    grad = torch.randn(6)
    for scale in (torch.randn(1), torch.randn(6, dtype=torch.float64), torch.randn(2, 3)):
        with pytest.raises(ValueError, match="scale must have grad's shape, dtype and device"):
            codec.decode_mul(packed, torch.randn(2, dtype=torch.float64), grad, 1, scale)
    assert triton_backend["decode_mul"] == 0


def test_probe_covers_every_half_value_and_the_specials():
    """The fused-forward check's inputs: all 65536 fp16/bf16 bit patterns; for fp32 the special values."""
    for dtype in (torch.float16, torch.bfloat16):
        p = T._probe(dtype, torch.device("cpu"))
        assert p.dtype == dtype and p.view(torch.int16).unique().numel() == 1 << 16
    bits = set(T._probe(torch.float32, torch.device("cpu")).view(torch.int32).tolist())
    fi = torch.finfo(torch.float32)
    for v in (0.0, -0.0, float("inf"), -float("inf"), fi.max, -fi.max, fi.tiny, 1e-45, -1e-45):
        assert torch.tensor([v], dtype=torch.float32).view(torch.int32).item() in bits, v
    assert any(torch.tensor([b], dtype=torch.int32).view(torch.float32).isnan().item() for b in bits)


def test_launches_make_the_tensors_gpu_current():
    """Triton launches on the current CUDA device and stream: a CUDA tensor's launch makes its device
    current (a cuda:1 tensor while cuda:0 is current); CPU tensors (interpreter) get no CUDA guard."""
    fake = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda:1"))
    guard = T._launch_on(fake)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(T._launch_on(torch.randn(2)), torch.cuda.device)


@pytest.mark.parametrize("name", ["silu", "gelu"])
def test_fused_forward_kernel_and_gate(name, monkeypatch):
    """The fused kernel's codes equal the reference and its f(x) is within an ulp of torch's; it is used
    only where the first-use check says bit-identical (here the interpreter's numpy exp/erf decides)."""
    fn = {"silu": F.silu, "gelu": F.gelu}[name]
    t = get_table(name, 3)
    for dtype in DTYPES:
        x = _inputs(4099, dtype, seed=7)[0].detach()
        cmp = codec.compare_borders(t.borders_for(dtype), dtype, t.right)
        y, packed = T.fused_forward_raw(name, x, cmp, t.bits, t.nan_code)
        want = codec.encode_reference(x, t.borders_for(dtype), t.bits, t.right, t.nan_code)
        assert torch.equal(packed, want)
        ref = fn(x)
        fin = x.isfinite()  # at inf/NaN torch's CPU kernels differ from its CUDA ones: the gate decides
        eps = torch.finfo(dtype).eps  # 1 + erf(x / sqrt 2) cancels for x << 0: absolute error there
        torch.testing.assert_close(y[fin], ref[fin], rtol=8 * eps, atol=8 * eps)
        fused = T.fused_forward(name, x, cmp, t.bits, t.nan_code)
        if T.fused_ok(name, dtype, x.device):
            assert same_bits(fused[0], ref)
        else:
            assert fused is None
    monkeypatch.setattr(T, "fused_ok", lambda *a: False)
    assert T.fused_forward(name, x, cmp, t.bits) is None


def test_backend_env_and_override(monkeypatch):
    codec.set_backend(None)
    try:
        monkeypatch.setenv("TIGHTFIT_FEWBIT_BACKEND", "triton")
        assert codec.backend("cpu") == "triton" == tightfit.fewbit.backend("cpu")
        monkeypatch.setenv("TIGHTFIT_FEWBIT_BACKEND", "torch")
        assert codec.backend("cpu") == "torch"
        monkeypatch.setenv("TIGHTFIT_FEWBIT_BACKEND", "native")
        assert codec.backend("cpu") == ("native" if codec._native.available() else "torch")
        codec.set_backend("torch")  # the argument overrides the environment
        assert codec.backend("cpu") == "torch"
        codec.set_backend(None)
        monkeypatch.setenv("TIGHTFIT_FEWBIT_BACKEND", "cuda-magic")
        with pytest.raises(ValueError, match="valid: auto, native, torch, triton"):
            tightfit.fewbit.backend()
        with pytest.raises(ValueError, match="valid"):
            codec.set_backend("cuda-magic")
    finally:
        codec.set_backend(None)
