"""Exact b-bit codec for few-bit activation codes: b in 1..8 bits per element, nothing more.

Layout (the contract every backend follows): the codes of a tensor are taken in row-major order, element i
occupies bits ``[i*b, (i+1)*b)`` of a little-endian bit stream, and bit j of the stream is bit ``j % 8`` of
byte ``j // 8``. A tensor of n codes packs into exactly ``ceil(n*b/8)`` bytes (codes straddle bytes for
b = 3, 5, 6, 7); unused high bits of the last byte are zero.

Three implementations, tested against each other:

- ``pack_reference`` / ``unpack_reference``: a bit matrix (n x b bits), obviously correct, memory hungry.
- ``pack`` / ``unpack``: vectorised pure torch. Groups of 8 codes make one integer of 8*b <= 64 bits
  (b = 8 uses 1-element groups so no shift reaches the sign bit), then split into b bytes.
- the native C kernels (``tightfit.fewbit._native``), which also fuse bucketizing (``encode``) and the
  gather-multiply of the backward (``decode_mul``). ``encode``/``decode_mul`` below dispatch to the
  selected backend; ``encode_reference``/``decode_mul_reference`` define what they must return.

Code semantics (``encode``), the rule of `tightfit.fewbit.tables`: x and the borders t are compared in
``compare_dtype(x.dtype)`` (fp32 for fp16/bf16/fp32, fp64 for fp64; pass ``Table.borders_for(dtype)``
for a table's per-op rounding), ``code = sum_k [x >= t_k if right[k] else x > t_k]``. NaN gets
``nan_code`` (default 0).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from tightfit.fewbit import _native  # importing builds nothing: the kernels compile on first use
from tightfit.fewbit._bits import check_bits

__all__ = [
    "packed_nbytes",
    "pack_reference",
    "unpack_reference",
    "pack",
    "unpack",
    "encode_reference",
    "decode_mul_reference",
    "encode",
    "decode_mul",
    "compare_borders",
    "compare_dtype",
    "get_backend",
    "set_backend",
    "BACKENDS",
]

BACKENDS = ("auto", "native", "torch")
_backend = os.environ.get("TIGHTFIT_FEWBIT_BACKEND", "auto")


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes taken by n codes of `bits` bits each: ceil(n*bits/8)."""
    bits = check_bits(bits)
    return (n * bits + 7) // 8


def _check_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor, got {codes.dtype}")
    return codes.reshape(-1)


# ---------------------------------------------------------------------------------------------------
# reference: a bit matrix
# ---------------------------------------------------------------------------------------------------


def pack_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (< 2**bits, any shape) into ceil(n*bits/8) bytes via an explicit bit matrix."""
    bits = check_bits(bits)
    flat = _check_codes(codes, bits).to(torch.int64)
    n = flat.numel()
    shifts = torch.arange(bits, device=flat.device)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)  # n*bits bits, element-major, LSB first
    nbytes = packed_nbytes(n, bits)
    stream = torch.cat([stream, stream.new_zeros(nbytes * 8 - stream.numel())])
    weights = 1 << torch.arange(8, device=flat.device)
    return (stream.reshape(nbytes, 8) * weights).sum(1).to(torch.uint8)


def unpack_reference(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_reference`: n uint8 codes from the packed bytes."""
    bits = check_bits(bits)
    stream = (packed.reshape(-1).to(torch.int64).unsqueeze(1) >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(-1)[: n * bits].reshape(n, bits)
    weights = 1 << torch.arange(bits, device=packed.device)
    return (stream * weights).sum(1).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------
# vectorised pure torch
# ---------------------------------------------------------------------------------------------------


def _group(bits: int) -> tuple[int, int]:
    """(codes per group, bytes per group): the smallest group whose bits fill whole bytes."""
    g = 8 // _gcd(bits, 8)
    return g, g * bits // 8


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes into ceil(n*bits/8) bytes (vectorised torch; same layout as `pack_reference`)."""
    bits = check_bits(bits)
    flat = _check_codes(codes, bits)
    n = flat.numel()
    g, nb = _group(bits)
    if bits == 8:
        return flat.clone()
    pad = (-n) % g
    words = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, g).to(torch.int64)
    words = (words << (torch.arange(g, device=flat.device) * bits)).sum(1, keepdim=True)
    out = ((words >> (torch.arange(nb, device=flat.device) * 8)) & 0xFF).to(torch.uint8)
    return out.reshape(-1)[: packed_nbytes(n, bits)]


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """n uint8 codes from bytes packed by `pack` (vectorised torch)."""
    bits = check_bits(bits)
    flat = packed.reshape(-1)
    if flat.numel() != packed_nbytes(n, bits):
        raise ValueError(f"{flat.numel()} packed bytes cannot hold exactly {n} codes of {bits} bits")
    if bits == 8:
        return flat.clone()
    g, nb = _group(bits)
    pad = (-flat.numel()) % nb
    words = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, nb).to(torch.int64)
    words = (words << (torch.arange(nb, device=flat.device) * 8)).sum(1, keepdim=True)
    codes = (words >> (torch.arange(g, device=flat.device) * bits)) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(-1)[:n]


# ---------------------------------------------------------------------------------------------------
# fused encode (bucketize + pack) and decode (unpack + gather + multiply)
# ---------------------------------------------------------------------------------------------------


def _flags(right: bool | Sequence[bool], k: int) -> list[bool]:
    if isinstance(right, bool):
        return [right] * k
    flags = [bool(r) for r in right]
    if len(flags) != k:
        raise ValueError(f"right needs one flag per border: got {len(flags)} flags for {k} borders")
    return flags


def compare_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype x and borders are compared in: fp32 for fp16/bf16/fp32 inputs (torch's opmath), else fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compare_borders(
    borders: torch.Tensor, dtype: torch.dtype, right: bool | Sequence[bool] = False
) -> torch.Tensor:
    """Sorted thresholds t' in the comparison dtype with ``code(x) = #{k : x > t'_k}`` for `dtype` inputs.

    Borders are rounded to the comparison dtype (`compare_dtype`; pass ``Table.borders_for(dtype)`` to
    get a table's per-op rounding). A border whose flag says ``x >= t`` becomes the next value below t
    in the comparison dtype (x is exactly representable there), so every comparison is a strict ``>``
    and the count does not depend on order.
    """
    flags = _flags(right, borders.numel())
    t = borders.detach().reshape(-1).to(compare_dtype(dtype))
    if any(flags):
        ge = torch.tensor(flags, dtype=torch.bool, device=t.device)
        t = torch.where(ge, torch.nextafter(t, torch.full_like(t, float("-inf"))), t)
    return t.sort().values.contiguous()


def _codes_reference(
    x: torch.Tensor, borders: torch.Tensor, right: bool | Sequence[bool], nan_code: int = 0
) -> torch.Tensor:
    xd = x.detach().reshape(-1).to(compare_dtype(x.dtype))
    b = borders.detach().reshape(-1).to(xd.dtype)
    codes = torch.zeros(xd.shape, dtype=torch.int64)
    for t, r in zip(b, _flags(right, b.numel())):
        codes += (xd >= t) if r else (xd > t)
    return torch.where(torch.isnan(xd), nan_code, codes).to(torch.uint8)


def encode_reference(
    x: torch.Tensor,
    borders: torch.Tensor,
    bits: int,
    right: bool | Sequence[bool] = False,
    nan_code: int = 0,
) -> torch.Tensor:
    """Packed codes: ``code = sum_k [x >= t_k if right[k] else x > t_k]``, compared in `compare_dtype`;
    ``nan_code`` where x is NaN."""
    if borders.numel() >= 1 << bits:
        raise ValueError(f"{borders.numel()} borders need more than {bits} bits")
    return pack_reference(_codes_reference(x, borders, right, nan_code), bits)


def decode_mul_reference(
    packed: torch.Tensor, levels: torch.Tensor, grad: torch.Tensor, bits: int
) -> torch.Tensor:
    """grad * levels[code] in grad's dtype, the levels first rounded to that dtype."""
    codes = unpack_reference(packed, bits, grad.numel()).long()
    return (levels.to(grad.dtype)[codes] * grad.reshape(-1)).reshape(grad.shape)


def _encode_torch(x: torch.Tensor, cmp: torch.Tensor, bits: int, nan_code: int = 0) -> torch.Tensor:
    xc = x.detach().reshape(-1)
    xc = xc.to(cmp.dtype) if xc.dtype != cmp.dtype else xc
    codes = torch.bucketize(xc, cmp.to(xc.device), right=False, out_int32=True)
    codes = torch.where(torch.isnan(xc), nan_code, codes).to(torch.uint8)
    return pack(codes, bits)


def _decode_mul_torch(
    packed: torch.Tensor,
    levels: torch.Tensor,
    grad: torch.Tensor,
    bits: int,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    codes = unpack(packed, bits, grad.numel()).long()
    g = grad if scale is None else grad * scale
    return (levels.to(grad.dtype)[codes] * g.reshape(-1)).reshape(grad.shape)


def get_backend() -> str:
    """The backend `encode`/`decode_mul` use: 'native' (C kernels, built lazily) or 'torch'."""
    if _backend == "auto":
        return "native" if _native.available() else "torch"
    return _backend


def set_backend(name: str) -> None:
    """Select 'auto' (native when it builds, else torch), 'native' or 'torch'."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown fewbit backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "native":
        if not _native.available():
            raise RuntimeError(f"the native fewbit kernels are unavailable: {_native.build_error()}")
    _backend = name


def _native_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in _native.DTYPES and get_backend() == "native"


def _check_table(borders: torch.Tensor, bits: int, nan_code: int) -> int:
    """``bits`` as an int, after checking that the borders and ``nan_code`` fit a ``bits``-bit code."""
    bits = check_bits(bits)
    if borders.numel() >= 1 << bits:
        raise ValueError(f"{borders.numel()} borders need more than {bits} bits")
    if not 0 <= nan_code <= borders.numel():
        raise ValueError(f"nan_code must be a code in [0, {borders.numel()}], got {nan_code}")
    return bits


def encode(
    x: torch.Tensor,
    borders: torch.Tensor,
    bits: int,
    right: bool | Sequence[bool] = False,
    nan_code: int = 0,
) -> torch.Tensor:
    """Packed codes of x (any shape/dtype/strides) in ceil(x.numel()*bits/8) bytes; see the module doc.
    NaN inputs get ``nan_code`` (a table's ``nan_code``: the piece whose level torch gives at NaN)."""
    bits = _check_table(borders, bits, nan_code)
    cmp = compare_borders(borders, x.dtype, right)
    if _native_ok(x):
        return _native.encode(x, cmp, bits, nan_code)
    return _encode_torch(x, cmp, bits, nan_code)


def silu_encode(
    x: torch.Tensor,
    borders: torch.Tensor,
    bits: int,
    right: bool | Sequence[bool] = False,
    nan_code: int = 0,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(``F.silu(x)``, ``encode(x, ...)``) in one pass where the native kernels can (contiguous fp32 on a
    CPU where torch runs its AVX-512 kernels; y bit-identical to torch's, checked at first use), else None.
    """
    if not (_native_ok(x) and x.dtype == torch.float32 and x.is_contiguous()):
        return None
    if not _native.silu_fused_available():
        return None
    bits = _check_table(borders, bits, nan_code)
    return _native.silu_encode(x, compare_borders(borders, x.dtype, right), bits, nan_code)


def decode_mul(
    packed: torch.Tensor,
    levels: torch.Tensor,
    grad: torch.Tensor,
    bits: int,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """grad * levels[code] (levels rounded to grad's dtype), contiguous, grad's shape. With `scale` (same
    shape and dtype): ``levels[code] * (grad * scale)``, exactly as those two torch products round, in
    one pass (a gated unit's backward) instead of a temporary for ``grad * scale``."""
    bits = check_bits(bits)
    if _native_ok(grad):
        return _native.decode_mul(packed, levels, grad, bits, scale)
    return _decode_mul_torch(packed, levels, grad, bits, scale)
