"""Triton kernels for the few-bit codec (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

Imported only when an op first asks for the Triton backend (`tightfit.fewbit.codec`), never by
``import tightfit``: Triton is an optional dependency. The layout and the code semantics are those of
`tightfit.fewbit.codec` (element i at bits ``[i*b, (i+1)*b)`` of a little-endian bit stream, codes
``#{k : x > t_k}`` against the sorted strict thresholds of `codec.compare_borders`, ``nan_code`` for NaN).

Kernels (one program handles ``BLOCK_G`` groups of 8 elements; a group's codes fill exactly ``bits``
bytes, so programs never share a byte and codes straddle bytes inside a group only):

- ``encode``: load x (fp32/fp16/bf16, compared in fp32), a branchless binary search over the borders padded
  to ``2**bits - 1`` slots with +inf (``bits`` probes of a table that stays in L1), the 8 codes of a group
  OR-ed into one integer of ``8*bits`` bits, written as ``bits`` bytes.
- ``fused forward`` (SiLU, GELU): the same pass also writes ``f(x)``. Used only where a first-use check
  finds the same bit pattern as torch's kernel on this device and dtype (`fused_ok`: every fp16/bf16
  value; for fp32 a sample with the special values); otherwise the op runs torch's kernel and then
  ``encode``.
- ``decode_mul``: read ``bits`` bytes per group, extract the 8 codes, gather the level (levels already
  rounded to the gradient's dtype), multiply by the gradient in fp32 and round once to its dtype, as
  torch's fp16/bf16 ``mul`` does. With ``scale`` (gated units), ``grad * scale`` is formed and rounded to
  the dtype first, exactly as torch's separate product would be, all in the same pass.

Each launch runs on the device of the tensors it reads, on that device's current torch stream (Triton
launches on the current CUDA device, so the tensor's device is made current for the launch).
Inputs that are not contiguous are copied first (the codes follow the tensor's logical row-major order).
``TRITON_INTERPRET=1`` must be set before the first few-bit op of the process (when this module is
imported): Triton decides at decoration time whether a kernel is compiled or interpreted.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from tightfit.fewbit._bitcmp import same_bits

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
"""True when the kernels run under Triton's interpreter (on CPU tensors)."""

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Input and gradient dtypes the kernels take (fp64 stays on the torch codec)."""

BLOCK_G = 4096 if INTERPRET else 256  # groups of 8 elements per program (numpy prefers large blocks)

if INTERPRET:  # the interpreter runs tl.math on numpy; it has no libdevice

    @triton.jit
    def _exp(x):
        return tl.exp(x)

    @triton.jit
    def _erf(x):
        return tl.erf(x)

    @triton.jit
    def _div(a, b):
        return a / b

else:
    from triton.language.extra import libdevice

    @triton.jit
    def _exp(x):
        return libdevice.exp(x)  # CUDA's expf, which torch's CUDA kernels call

    @triton.jit
    def _erf(x):
        return libdevice.erf(x)

    @triton.jit
    def _div(a, b):
        return libdevice.div_rn(a, b)  # IEEE division, as nvcc compiles '/' without fast math


@triton.jit
def _round_bf16(v):
    """fp32 v rounded to the nearest bf16 (ties to even; NaN kept), as an fp32 value. Done on the bits so
    the interpreter (whose fp32 -> bf16 cast truncates) rounds as the GPU does."""
    u = v.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, r.to(tl.float32, bitcast=True))


@triton.jit
def _cast_out(v, ptr, IS_BF16: tl.constexpr):
    """fp32 v rounded once to the element type of `ptr` (bf16 on the bits, subnormals included)."""
    if IS_BF16:
        r = _round_bf16(v).to(tl.uint32, bitcast=True)
        return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _load_f32(ptr, idx, mask, IS_BF16: tl.constexpr):
    """Elements of `ptr` as fp32 (exact; bf16 widened on the bits, subnormals included)."""
    v = tl.load(ptr + idx, mask=mask, other=0.0)
    if IS_BF16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return v.to(tl.float32)


@triton.jit
def _codes(x, pad_ptr, nan_code, BITS: tl.constexpr):
    """Codes of fp32 x: binary search over 2**BITS - 1 sorted slots (+inf padded); NaN -> nan_code."""
    c = tl.zeros(x.shape, dtype=tl.int32)
    for level in tl.static_range(BITS):  # probe slot c + step - 1, step = 2**(BITS - 1 - level)
        t = tl.load(pad_ptr + c + ((1 << (BITS - 1 - level)) - 1))
        c = tl.where(x > t, c + (1 << (BITS - 1 - level)), c)
    return tl.where(x != x, nan_code, c)


@triton.jit
def _store_packed(c, out_ptr, g, nbytes, BITS: tl.constexpr, BPAD: tl.constexpr):
    """Pack the (BLOCK_G, 8) codes c of groups g into BITS bytes per group."""
    j = tl.arange(0, 8)
    t = tl.arange(0, BPAD)
    if BITS <= 4:  # a group's 8 codes fit 32 bits
        w = tl.sum(c << (j[None, :] * BITS), axis=1)  # disjoint bits: the sum is their OR
        byte = (w[:, None] >> (t[None, :] * 8)) & 0xFF
    else:
        w = tl.sum(c.to(tl.int64) << (j[None, :] * BITS).to(tl.int64), axis=1)
        byte = (w[:, None] >> (t[None, :] * 8).to(tl.int64)) & 0xFF
    o = g[:, None] * BITS + t[None, :]
    tl.store(out_ptr + o, byte.to(tl.uint8), mask=(t[None, :] < BITS) & (o < nbytes))


@triton.jit
def _encode_kernel(
    x_ptr, out_ptr, pad_ptr, n, nbytes, nan_code,
    IS_BF16: tl.constexpr, BITS: tl.constexpr, BPAD: tl.constexpr, BLOCK_G: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    idx = g[:, None] * 8 + tl.arange(0, 8)[None, :]
    m = idx < n
    x = _load_f32(x_ptr, idx, m, IS_BF16)
    c = tl.where(m, _codes(x, pad_ptr, nan_code, BITS), 0)
    _store_packed(c, out_ptr, g, nbytes, BITS, BPAD)


@triton.jit
def _fused_kernel(
    x_ptr, y_ptr, out_ptr, pad_ptr, n, nbytes, nan_code,
    FN: tl.constexpr, IS_BF16: tl.constexpr, BITS: tl.constexpr, BPAD: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """y = f(x) (FN 0: silu, 1: gelu) in fp32 opmath rounded to y's dtype, and the codes of x."""
    g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    idx = g[:, None] * 8 + tl.arange(0, 8)[None, :]
    m = idx < n
    x = _load_f32(x_ptr, idx, m, IS_BF16)
    if FN == 0:
        y = _div(x, 1.0 + _exp(-x))  # ATen: x / (1 + exp(-x))
    else:
        y = x * 0.5 * (1.0 + _erf(x * 0.7071067811865476))  # ATen: x * 0.5 * (1 + erf(x * M_SQRT1_2))
    tl.store(y_ptr + idx, _cast_out(y, y_ptr, IS_BF16), mask=m)
    c = tl.where(m, _codes(x, pad_ptr, nan_code, BITS), 0)
    _store_packed(c, out_ptr, g, nbytes, BITS, BPAD)


@triton.jit
def _decode_kernel(
    in_ptr, lv_ptr, g_ptr, s_ptr, out_ptr, n, nbytes,
    HAS_SCALE: tl.constexpr, IS_BF16: tl.constexpr,
    BITS: tl.constexpr, BPAD: tl.constexpr, BLOCK_G: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    t = tl.arange(0, BPAD)
    o = g[:, None] * BITS + t[None, :]
    by = tl.load(in_ptr + o, mask=(t[None, :] < BITS) & (o < nbytes), other=0)
    j = tl.arange(0, 8)
    if BITS <= 4:  # a group's 8 codes fit 32 bits (sign bits shifted in are masked off)
        w = tl.sum(by.to(tl.int32) << (t[None, :] * 8), axis=1)
        c = (w[:, None] >> (j[None, :] * BITS)) & ((1 << BITS) - 1)
    else:
        w = tl.sum(by.to(tl.int64) << (t[None, :] * 8).to(tl.int64), axis=1)
        c = ((w[:, None] >> (j[None, :] * BITS).to(tl.int64)) & ((1 << BITS) - 1)).to(tl.int32)
    idx = g[:, None] * 8 + j[None, :]
    m = idx < n
    lv = tl.load(lv_ptr + c)
    gr = _load_f32(g_ptr, idx, m, IS_BF16)
    if HAS_SCALE:  # torch's grad * scale, rounded to the dtype
        gs = _cast_out(gr * _load_f32(s_ptr, idx, m, IS_BF16), out_ptr, IS_BF16)
        if IS_BF16:
            gr = (gs.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            gr = gs.to(tl.float32)
    out = lv * gr
    tl.store(out_ptr + idx, _cast_out(out, out_ptr, IS_BF16), mask=m)


# ---------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------


def _launch_on(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Where a kernel launch on `t`'s data runs: Triton launches on the *current* CUDA device and its
    current stream, so a CUDA tensor's device is made current for the launch (its current stream then
    is the one torch uses for that device). Under the interpreter (CPU tensors): numpy's warnings, where
    the GPU silently gives inf/NaN (exp overflow), are silenced."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    if not INTERPRET:
        return contextlib.nullcontext()
    import numpy as np

    return np.errstate(all="ignore")


def _bpad(bits: int) -> int:
    return 1 << (bits - 1).bit_length()  # next power of two >= bits (tl.arange needs one)


def _pad_table(cmp_borders: torch.Tensor, bits: int, device: torch.device) -> torch.Tensor:
    """The sorted thresholds padded with +inf to 2**bits - 1 slots, made on `device` (no host sync)."""
    pad = torch.full(((1 << bits) - 1,), float("inf"), dtype=torch.float32, device=device)
    pad[: cmp_borders.numel()] = cmp_borders.detach().to(device, torch.float32)
    return pad


def _grid(n: int) -> tuple[int]:
    return (max(1, triton.cdiv(triton.cdiv(n, 8), BLOCK_G)),)


def encode(x: torch.Tensor, cmp_borders: torch.Tensor, bits: int, nan_code: int = 0) -> torch.Tensor:
    """Packed codes of x (fp32/fp16/bf16, any strides) against the sorted fp32 thresholds
    `cmp_borders` (`codec.compare_borders`), ``nan_code`` where x is NaN."""
    xc = x.detach().contiguous().reshape(-1)
    n = xc.numel()
    nbytes = (n * bits + 7) // 8
    out = torch.empty(nbytes, dtype=torch.uint8, device=xc.device)
    if n:
        pad = _pad_table(cmp_borders, bits, xc.device)
        with _launch_on(xc):
            _encode_kernel[_grid(n)](
                xc, out, pad, n, nbytes, nan_code,
                IS_BF16=xc.dtype == torch.bfloat16, BITS=bits, BPAD=_bpad(bits), BLOCK_G=BLOCK_G,
            )
    return out


FUSED = {"silu": 0, "gelu": 1}
"""Activations with a fused forward kernel (the registry name -> kernel id)."""


def fused_forward_raw(
    name: str, x: torch.Tensor, cmp_borders: torch.Tensor, bits: int, nan_code: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), packed codes) from the fused kernel, whether or not it matches torch here (see `fused_ok`)."""
    xc = x.detach().contiguous()
    n = xc.numel()
    nbytes = (n * bits + 7) // 8
    y = torch.empty_like(xc)
    out = torch.empty(nbytes, dtype=torch.uint8, device=xc.device)
    if n:
        pad = _pad_table(cmp_borders, bits, xc.device)
        with _launch_on(xc):
            _fused_kernel[_grid(n)](
                xc, y, out, pad, n, nbytes, nan_code,
                FN=FUSED[name], IS_BF16=xc.dtype == torch.bfloat16, BITS=bits, BPAD=_bpad(bits),
                BLOCK_G=BLOCK_G,
            )
    return y, out


def _probe(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The inputs the fused forward is checked on. fp16/bf16: every one of the 65536 bit patterns. fp32:
    a random sample over wide magnitudes of both signs, a dense grid over [-12, 12] (where the functions
    bend) and the specials: +-0, +-inf, NaN of both signs, subnormals (the smallest included), the
    smallest normal and the largest finite value of both signs, and the exp/erf overflow edges."""
    if dtype != torch.float32:
        return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int16).view(dtype).to(device)
    g = torch.Generator().manual_seed(0)
    n = 1 << 14 if INTERPRET else 1 << 22
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp(3 * torch.randn(n, generator=g))
    x = x.to(torch.float32)
    fi = torch.finfo(torch.float32)
    specials = torch.tensor(
        [float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-40, 1e-45, -1e-45,
         fi.tiny, -fi.tiny, fi.max, -fi.max, 88.7, -88.7, 104.0, -104.0, 10.0, -10.0, 5.0, -5.0],
        dtype=torch.float32,
    )
    x[: specials.numel()] = specials
    grid = torch.linspace(-12, 12, 1 << 12)
    x[specials.numel() : specials.numel() + grid.numel()] = grid
    return x.to(device)


@functools.cache
def _fused_check(name: str, dtype: torch.dtype, device: str) -> bool:
    from tightfit.fewbit.activations import spec_for_name

    x = _probe(dtype, torch.device(device))
    y, _ = fused_forward_raw(name, x, torch.zeros(1, device=x.device), 1)
    return same_bits(y, spec_for_name(name).fn(x))


def fused_ok(name: str, dtype: torch.dtype, device: torch.device) -> bool:
    """True where the fused forward of `name` gives torch's kernel's output bit for bit for `dtype` on
    `device`: the same bit pattern at every probe input (so -0.0 vs +0.0 or inf vs the largest finite
    value fail the check; NaN must meet NaN, its payload not compared). Checked once per function, dtype
    and device; the probe is every fp16/bf16 value, and for fp32 the sample described in `_probe`."""
    if name not in FUSED or dtype not in DTYPES:
        return False
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _fused_check(name, dtype, str(device))


def fused_forward(
    name: str, x: torch.Tensor, cmp_borders: torch.Tensor, bits: int, nan_code: int = 0
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(f(x), packed codes) in one pass where `fused_ok`, else None. y is contiguous, x's shape."""
    if not fused_ok(name, x.dtype, x.device):
        return None
    return fused_forward_raw(name, x, cmp_borders, bits, nan_code)


def decode_mul(
    packed: torch.Tensor,
    levels: torch.Tensor,
    grad: torch.Tensor,
    bits: int,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """grad * levels[code] (levels rounded to grad's dtype), contiguous, grad's shape; with `scale`,
    ``levels[code] * (grad * scale)`` rounded as those two torch products round."""
    g = grad.contiguous()
    n = g.numel()
    nbytes = (n * bits + 7) // 8
    if packed.numel() != nbytes:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {n} codes of {bits} bits")
    s = None if scale is None else scale.contiguous()  # its shape, dtype and device: checked by the codec
    table = torch.zeros(1 << bits, dtype=torch.float32, device=g.device)  # any code < 2**bits is valid
    table[: levels.numel()] = levels.detach().to(g.device).to(g.dtype).to(torch.float32)  # no host sync
    out = torch.empty_like(g)
    if n:
        with _launch_on(g):
            _decode_kernel[_grid(n)](
                packed.contiguous(), table, g, g if s is None else s, out, n, nbytes,
                HAS_SCALE=s is not None, IS_BF16=g.dtype == torch.bfloat16, BITS=bits, BPAD=_bpad(bits),
                BLOCK_G=BLOCK_G,
            )
    return out
