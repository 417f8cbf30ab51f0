"""The b-bit codec: exact sizes, byte layout, and every backend against the bit-matrix reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tightfit.fewbit import _native, codec
from tightfit.fewbit._bitcmp import same_bits

LENGTHS = [0, 1, 3, 7, 8, 9, 63, 64, 65, 127, 1001]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NATIVE = _native.available()


def test_known_layout():
    # bits=3: 5 -> bits 0-2, 3 -> bits 3-5: byte 5 | 3 << 3 = 29
    assert codec.pack_reference(torch.tensor([5, 3], dtype=torch.uint8), 3).tolist() == [29]
    # bits=5: 31 | 1 << 5 = 63, and the second byte holds the top bit of 1<<5 -> 0
    assert codec.pack_reference(torch.tensor([31, 1], dtype=torch.uint8), 5).tolist() == [63, 0]
    # bits=7 straddles: 127 | 127 << 7 = 0x3fff -> [255, 63]
    assert codec.pack_reference(torch.tensor([127, 127], dtype=torch.uint8), 7).tolist() == [255, 63]


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_all_lengths(bits):
    for n in LENGTHS:
        codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8)
        ref = codec.pack_reference(codes, bits)
        assert ref.numel() == (n * bits + 7) // 8 == codec.packed_nbytes(n, bits)
        assert torch.equal(codec.unpack_reference(ref, bits, n), codes)
        assert torch.equal(codec.pack(codes, bits), ref)
        assert torch.equal(codec.unpack(ref, bits, n), codes)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 2**16))
def test_roundtrip_property(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8, generator=g)
    packed = codec.pack(codes, bits)
    assert packed.numel() == codec.packed_nbytes(n, bits)
    assert torch.equal(codec.unpack(packed, bits, n), codes)


def _table(bits, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randn(k, dtype=torch.float64, generator=g) * 1.5).values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_encode_decode_against_reference(dtype, backend):
    if backend == "native" and not NATIVE:
        pytest.skip(f"native kernels unavailable here: {_native.build_error()}")
    codec.set_backend(backend)
    try:
        for bits in range(1, 9):
            # every SIMD path: counted (k < bits), in-register search, coarse + gathered search
            for k in sorted({1, 2, 3, max(1, bits - 1), 1 << (bits - 1), (1 << bits) - 1}):
                if k >= 1 << bits:
                    continue
                for right in (False, True, [bool(i % 2) for i in range(k)]):
                    n = 517
                    x = (torch.randn(n + 3) * 2).to(dtype)[3:]  # offset storage
                    borders = _table(bits, k, seed=bits * 31 + k)
                    x[:k] = borders.to(dtype)  # exact ties with every border
                    x[200:203] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)
                    nan_code = (k + 1) // 2
                    ref = codec.encode_reference(x, borders, bits, right, nan_code)
                    got = codec.encode(x, borders, bits, right, nan_code)
                    assert torch.equal(got, ref), (bits, k, right)
                    assert codec.unpack(got, bits, n)[200] == nan_code
                    levels = torch.randn(1 << bits, dtype=torch.float64)
                    grad = torch.randn(n).to(dtype)
                    want = codec.decode_mul_reference(ref, levels, grad, bits)
                    assert torch.equal(codec.decode_mul(ref, levels, grad, bits), want), (bits, k)
                    scale = (torch.randn(n) * 3).to(dtype)  # fused (grad * scale) of gated units
                    want = codec.decode_mul_reference(ref, levels, grad * scale, bits)
                    got = codec.decode_mul(ref, levels, grad, bits, scale)
                    assert torch.equal(got, want), (bits, k, "scale")
    finally:
        codec.set_backend("auto")


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_non_contiguous_and_shapes(backend):
    if backend == "native" and not NATIVE:
        pytest.skip(f"native kernels unavailable here: {_native.build_error()}")
    codec.set_backend(backend)
    try:
        x = torch.randn(9, 13, 5).transpose(0, 2)[:, ::2]
        borders = _table(3, 7)
        got = codec.encode(x, borders, 3)
        assert torch.equal(got, codec.encode_reference(x.contiguous(), borders, 3))
        grad = torch.randn(x.shape).transpose(0, 1).contiguous().transpose(0, 1)
        out = codec.decode_mul(got, torch.randn(8, dtype=torch.float64), grad, 3)
        assert out.shape == x.shape
    finally:
        codec.set_backend("auto")


def test_native_large_multithreaded_matches_torch():
    """Large inputs split over threads (the SIMD stores must not cross into another thread's bytes)."""
    if not NATIVE:
        pytest.skip(f"native kernels unavailable here: {_native.build_error()}")
    torch.set_num_threads(2)
    try:
        x = torch.randn(1 << 20 | 13)
        x[::1001] = float("nan")
        for bits in range(1, 9):
            borders = _table(bits, (1 << bits) - 1)
            cmp = codec.compare_borders(borders, x.dtype, False)
            p = _native.encode(x, cmp, bits, nan_code=1)
            assert torch.equal(p, codec._encode_torch(x, cmp, bits, nan_code=1)), bits
            levels = torch.randn(1 << bits, dtype=torch.float64)
            g, scale = torch.randn(x.shape), torch.randn(x.shape)
            assert torch.equal(
                _native.decode_mul(p, levels, g, bits), codec._decode_mul_torch(p, levels, g, bits)
            )
            assert torch.equal(
                _native.decode_mul(p, levels, g, bits, scale),
                codec._decode_mul_torch(p, levels, g, bits, scale),
            )
    finally:
        torch.set_num_threads(1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="1..8"):
        codec.packed_nbytes(10, 9)
    with pytest.raises(ValueError, match="need more than"):
        codec.encode(torch.randn(4), torch.arange(4, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="nan_code must be a code in"):
        codec.encode(torch.randn(4), torch.arange(3, dtype=torch.float64), 2, nan_code=4)
    with pytest.raises(ValueError, match="cannot hold"):
        codec.unpack(torch.zeros(3, dtype=torch.uint8), 2, 20)
    with pytest.raises(ValueError, match="valid"):
        codec.set_backend("cuda-magic")
    with pytest.raises(TypeError, match="uint8"):
        codec.pack(torch.zeros(3), 2)


def test_native_output_buffers_take_huge_page_advice(monkeypatch):
    """Large buffers of the native kernels are advised as huge pages over their whole 2 MiB-aligned
    interior (fewer page faults on first write); small ones are left alone; the advice never changes data."""
    calls = []
    monkeypatch.setattr(_native, "_madvise", lambda: lambda p, n, advice: calls.append((p, n, advice)) or 0)
    t = _native.empty(3 << 20, torch.float32)  # 12 MiB
    assert t.shape == (3 << 20,) and t.dtype == torch.float32
    (p, n, advice), = calls
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * 4
    assert advice == 14 and p % (2 << 20) == 0 and n % (2 << 20) == 0
    assert start <= p < start + (2 << 20) and end - (2 << 20) < p + n <= end
    _native.empty(1000, torch.float32)
    assert len(calls) == 1


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_mismatched_scale_raises_before_any_kernel(backend):
    """decode_mul's scale must match grad's shape and dtype on every backend (the Triton one is checked in
    triton_cases): no backend broadcasts or promotes it."""
    if backend == "native" and not NATIVE:
        pytest.skip(f"native kernels unavailable here: {_native.build_error()}")
    codec.set_backend(backend)
    try:
        packed = codec.encode(torch.randn(6), torch.tensor([0.0]), 1)
        levels, grad = torch.randn(2, dtype=torch.float64), torch.randn(6)
        for scale in (torch.randn(1), torch.randn(6, dtype=torch.float64), torch.randn(2, 3)):
            with pytest.raises(ValueError, match="scale must have grad's shape, dtype and device"):
                codec.decode_mul(packed, levels, grad, 1, scale)
        scale = torch.randn(6)
        assert torch.equal(codec.decode_mul(packed, levels, grad, 1, scale),
                           codec.decode_mul_reference(packed, levels, grad * scale, 1))
    finally:
        codec.set_backend(None)


def test_compare_borders_is_cached_per_tensor_and_refreshed_after_an_in_place_change():
    """The >=-flag mask is not rebuilt (on the borders' device: a host sync on CUDA) on every op."""
    borders = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    right = [True, False, True]
    first = codec.compare_borders(borders, torch.float32, right)
    assert codec.compare_borders(borders, torch.float32, right) is first
    assert codec.compare_borders(borders, torch.float32, False) is not first
    want = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float32)
    want[[0, 2]] = torch.nextafter(want[[0, 2]], torch.tensor(-float("inf")))
    assert torch.equal(first, want)
    borders[1] = 1.5  # an in-place change invalidates the cached thresholds
    again = codec.compare_borders(borders, torch.float32, right)
    assert again is not first and again[1].item() == 1.5
    with torch.inference_mode():  # inference tensors have no version counter: computed, never cached
        inf_b = torch.tensor([0.0, 1.0])
        assert torch.equal(codec.compare_borders(inf_b, torch.float32, True),
                           codec.compare_borders(inf_b.clone(), torch.float32, True))


def test_triton_cuda_probe_is_per_device(monkeypatch):
    """Each CUDA device gets its own compile-and-check of the Triton kernels (and its own verdict)."""
    import types

    probed = []

    def probe(mod, device):
        probed.append(str(device))
        return (device.index == 0, None if device.index == 0 else "ptxas failed for this architecture")

    monkeypatch.setattr(codec, "_triton_module", lambda: types.SimpleNamespace(INTERPRET=False))
    monkeypatch.setattr(codec, "_probe_triton_cuda", probe)
    monkeypatch.setattr(codec, "_triton_cuda", {})
    for _ in range(2):
        assert codec._triton_why_not(torch.device("cuda:0")) is None
        assert "cuda:1: ptxas failed" in codec._triton_why_not("cuda:1")
    assert probed == ["cuda:0", "cuda:1"]


def test_same_bits_is_stricter_than_equal():
    """The fused check's comparison: signed zeros and inf vs the largest finite value differ; NaNs with
    different payloads match each other only."""
    for dtype in DTYPES:  # fp32, fp64, fp16, bf16
        z = torch.tensor([0.0, 1.0], dtype=dtype)
        assert torch.equal(z, -z * torch.tensor([1.0, -1.0], dtype=dtype))
        assert not same_bits(z, -z * torch.tensor([1.0, -1.0], dtype=dtype))  # -0.0 vs +0.0
        inf = torch.tensor([float("inf")], dtype=dtype)
        assert not same_bits(inf, torch.tensor([torch.finfo(dtype).max], dtype=dtype))
        nan = torch.tensor([float("nan")], dtype=dtype)
        assert same_bits(nan, -nan) and not same_bits(nan, inf) and same_bits(z, z.clone())
