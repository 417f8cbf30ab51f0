"""Exact b-bit codec for few-bit activation codes: b in 1..8 bits per element, nothing more.

Layout (the contract every backend follows): the codes of a tensor are taken in row-major order, element i
occupies bits ``[i*b, (i+1)*b)`` of a little-endian bit stream, and bit j of the stream is bit ``j % 8`` of
byte ``j // 8``. A tensor of n codes packs into exactly ``ceil(n*b/8)`` bytes (codes straddle bytes for
b = 3, 5, 6, 7); unused high bits of the last byte are zero.

Three implementations, tested against each other:

- ``pack_reference`` / ``unpack_reference``: a bit matrix (n x b bits), obviously correct, memory hungry.
- ``pack`` / ``unpack``: vectorised pure torch. Groups of 8 codes make one integer of 8*b <= 64 bits
  (b = 8 uses 1-element groups so no shift reaches the sign bit), then split into b bytes.
- the native C kernels for the CPU (``tightfit.fewbit._native``) and the Triton kernels for CUDA
  (``tightfit.fewbit._triton``), which also fuse bucketizing (``encode``) and the gather-multiply of the
  backward (``decode_mul``). ``encode``/``decode_mul`` below dispatch to the selected backend;
  ``encode_reference``/``decode_mul_reference`` define what they must return.

Backend selection (`backend`): per device, the automatic choice is 'native' on the CPU (when the C kernels
build), 'triton' on a CUDA device (when Triton imports, and compiles and checks out on that device), else
'torch'. ``TIGHTFIT_FEWBIT_BACKEND``
(auto, native, torch, triton; read at each op) or `set_backend` (which overrides it) forces one where it
can run; with ``TRITON_INTERPRET=1`` set before the first op, 'triton' also runs on CPU tensors. A forced
backend that cannot run on a device (Triton missing or failing to compile, no C compiler, native on
CUDA) gives that device its automatic choice, with a RuntimeWarning once and a note in `backend_notes`.

Code semantics (``encode``), the rule of `tightfit.fewbit.tables`: x and the borders t are compared in
``compare_dtype(x.dtype)`` (fp32 for fp16/bf16/fp32, fp64 for fp64; pass ``Table.borders_for(dtype)``
for a table's per-op rounding), ``code = sum_k [x >= t_k if right[k] else x > t_k]``. NaN gets
``nan_code`` (default 0).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Hashable, Sequence
from types import ModuleType
from typing import TypeVar

import torch
from torch.utils import _python_dispatch
from torch.utils.weak import WeakIdKeyDictionary

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
    "backend",
    "backend_notes",
    "fused_encode",
    "BACKENDS",
    "BACKEND_ENV",
]

BACKENDS = ("auto", "native", "torch", "triton")
BACKEND_ENV = "TIGHTFIT_FEWBIT_BACKEND"
_backend: str | None = None  # set_backend's choice; None: the environment's
_T = TypeVar("_T")


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


def _plain(t: torch.Tensor) -> bool:
    """True for an eager, plain tensor outside any tracing or dispatch mode: what may be cached."""
    return (
        type(t) is torch.Tensor
        and not torch.compiler.is_compiling()
        and _python_dispatch._get_current_dispatch_mode() is None
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def _version(t: torch.Tensor) -> int | None:
    """t's in-place version counter, None for inference tensors (they have none: never cached)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _cached(cache: WeakIdKeyDictionary, t: torch.Tensor, key: Hashable, make: Callable[[], _T]) -> _T:
    """``make()`` for tensor `t` and `key`, cached in `cache` (t -> {key: (t's version, value)}) while t
    lives and is not modified in place; made afresh, as is, each call where t may not be cached
    (`_plain`, `_version`). A cached value is made outside inference mode and with autograd off, so one
    made under inference mode stays usable in training. It is shared: do not modify it."""
    version = _version(t) if _plain(t) else None
    if version is None:
        return make()
    per = cache.get(t)
    hit = None if per is None else per.get(key)
    if hit is not None and hit[0] == version:
        return hit[1]
    with torch.inference_mode(False), torch.no_grad():
        value = make()
    if per is None:
        per = cache.setdefault(t, {})
    per[key] = (version, value)
    return value


_cmp_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()  # borders -> {(dtype, flags): (version, t')}


def compare_borders(
    borders: torch.Tensor, dtype: torch.dtype, right: bool | Sequence[bool] = False
) -> torch.Tensor:
    """Sorted thresholds t' in the comparison dtype with ``code(x) = #{k : x > t'_k}`` for `dtype` inputs.

    Borders are rounded to the comparison dtype (`compare_dtype`; pass ``Table.borders_for(dtype)`` to
    get a table's per-op rounding). A border whose flag says ``x >= t`` becomes the next value below t
    in the comparison dtype (x is exactly representable there), so every comparison is a strict ``>``
    and the count does not depend on order.

    The result is cached per borders tensor (while it lives and is not modified in place), dtype and
    flags: the flags would otherwise be copied to the borders' device on every op (a host sync on CUDA).
    The cached tensor is shared: do not modify it.
    """
    flags = _flags(right, borders.numel())
    key = (dtype, tuple(flags))
    return _cached(_cmp_cache, borders, key, lambda: _compare_borders(borders, dtype, flags))


def _compare_borders(borders: torch.Tensor, dtype: torch.dtype, flags: list[bool]) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------------------
# backend selection
# ---------------------------------------------------------------------------------------------------

_lock = threading.Lock()
_notes: list[str] = []
_triton_state: dict[str, object] = {}  # "module" (the loaded _triton) or "error"
_triton_cuda: dict[str, tuple[bool, str | None]] = {}  # "cuda:i" -> (kernels run there, why not)


def _note(msg: str) -> None:
    """Record a fallback once and warn once (RuntimeWarning): a slower path, never an error."""
    with _lock:
        if msg in _notes:
            return
        _notes.append(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=4)


def backend_notes() -> list[str]:
    """Why a requested or expected backend was not used (each fallback once, in order), e.g. Triton
    missing on a CUDA machine."""
    return list(_notes)


def _requested() -> str:
    if _backend is not None:
        return _backend
    value = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"{BACKEND_ENV}={os.environ.get(BACKEND_ENV)!r} is not a few-bit backend; "
            f"valid: {', '.join(BACKENDS)} (or unset for auto)"
        )
    return value


def _triton_module() -> ModuleType | None:
    """`tightfit.fewbit._triton`, imported on first use (Triton is optional), or None with the reason in
    ``_triton_state["error"]``."""
    if "module" not in _triton_state and "error" not in _triton_state:
        with _lock:
            if "module" not in _triton_state and "error" not in _triton_state:
                try:
                    from tightfit.fewbit import _triton

                    _triton_state["module"] = _triton
                except Exception as exc:  # ImportError, or a broken Triton install
                    _triton_state["error"] = f"Triton cannot be imported ({type(exc).__name__}: {exc})"
    return _triton_state.get("module")  # type: ignore[return-value]


def _cuda_key(device: torch.device) -> str:
    """"cuda:i" for a CUDA device (an index-less "cuda" means the current device)."""
    if device.index is not None:
        return f"cuda:{device.index}"
    return f"cuda:{torch.cuda.current_device() if torch.cuda.is_available() else 0}"


def _triton_why_not(device: str | torch.device) -> str | None:
    """None when the Triton kernels run on tensors of `device`, else why not. On CUDA the kernels are
    compiled and checked once per device (GPUs of one machine may differ in architecture)."""
    device = torch.device(device)
    mod = _triton_module()
    if mod is None:
        return str(_triton_state["error"])
    if mod.INTERPRET:
        return None if device.type == "cpu" else "TRITON_INTERPRET=1 runs Triton on CPU tensors only"
    if device.type != "cuda":
        return f"Triton runs on CUDA tensors (on CPU tensors only with TRITON_INTERPRET=1), not {device.type}"
    key = _cuda_key(device)
    if key not in _triton_cuda:
        with _lock:
            if key not in _triton_cuda:
                _triton_cuda[key] = _probe_triton_cuda(mod, torch.device(key))
    ok, why = _triton_cuda[key]
    return None if ok else f"{key}: {why}"


def _probe_triton_cuda(mod: ModuleType, device: torch.device) -> tuple[bool, str | None]:
    """Compile and run the encode kernel once on `device` (a missing compiler or ptxas fails here)."""
    try:
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        x = torch.linspace(-3, 3, 1001, device=device)
        cmp = torch.tensor([-1.0, 0.0, 1.0], device=device)
        got = mod.encode(x, cmp, 2, 0)
        if not torch.equal(got.cpu(), _encode_torch(x.cpu(), cmp.cpu(), 2, 0)):
            return False, "the Triton encode kernel disagrees with the reference codec on this device"
        return True, None
    except Exception as exc:  # compiler or driver missing, or a broken toolchain
        return False, f"the Triton kernels failed to compile or run ({type(exc).__name__}: {exc})"


def _auto(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cpu":
        return "native" if _native.available() else "torch"
    if device.type == "cuda":
        why = _triton_why_not(device)
        if why is None:
            return "triton"
        _note(f"tightfit few-bit: the Triton kernels are unavailable for CUDA tensors ({why}); "
              "using the pure-torch codec (correct, slower)")
    return "torch"


def backend(device: str | torch.device | None = None) -> str:
    """The name of the backend ('torch', 'native' or 'triton') the next few-bit op on `device` will use.

    `device` defaults to "cuda" where CUDA is available, else "cpu" (an index-less "cuda" means the
    current device). Triton's availability is probed once per CUDA device. Raises ValueError naming the
    valid values when ``TIGHTFIT_FEWBIT_BACKEND`` holds anything else.
    """
    dev = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    device_type = dev.type
    req = _requested()
    if req == "torch":
        return "torch"
    if req == "triton":
        why = _triton_why_not(dev)
        if why is None:
            return "triton"
        chosen = _auto(dev)
        _note(f"tightfit few-bit: backend 'triton' was requested but cannot run on {device_type} tensors "
              f"({why}); using '{chosen}'")
        return chosen
    if req == "native":
        if device_type == "cpu" and _native.available():
            return "native"
        chosen = _auto(dev)
        why = _native.build_error() if device_type == "cpu" else "the C kernels run on the CPU only"
        _note(f"tightfit few-bit: backend 'native' was requested but cannot run on {device_type} tensors "
              f"({why}); using '{chosen}'")
        return chosen
    return _auto(dev)


def get_backend(device: str | torch.device | None = None) -> str:
    """Same as `backend` (kept for callers of the earlier name)."""
    return backend(device)


def set_backend(name: str | None) -> None:
    """Force a backend for every op of this process: 'auto', 'native', 'torch' or 'triton' (overriding
    ``TIGHTFIT_FEWBIT_BACKEND``); None returns to the environment's choice. 'native' raises RuntimeError
    when the C kernels cannot be built, 'triton' when Triton cannot be imported."""
    global _backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown fewbit backend {name!r}; valid: {', '.join(BACKENDS)}")
    if name == "native" and not _native.available():
        raise RuntimeError(f"the native fewbit kernels are unavailable: {_native.build_error()}")
    if name == "triton" and _triton_module() is None:
        raise RuntimeError(f"the Triton fewbit kernels are unavailable: {_triton_state['error']}")
    _backend = name


def _kernels(t: torch.Tensor) -> ModuleType | None:
    """The kernel module the codec runs for `t` (`_native`, or the Triton one; both take the same
    arguments), None for the pure-torch codec; the backend is looked up once."""
    if t.device.type not in ("cpu", "cuda"):
        return None
    name = backend(t.device)
    if name == "native":
        return _native if t.device.type == "cpu" and t.dtype in _native.DTYPES else None
    if name != "triton":
        return None
    mod = _triton_module()
    return mod if mod is not None and t.dtype in mod.DTYPES else None


def _native_ok(t: torch.Tensor) -> bool:
    return _kernels(t) is _native


def _triton_for(t: torch.Tensor) -> ModuleType | None:
    """The Triton kernel module when `t` goes to the Triton backend, else None."""
    kernels = _kernels(t)
    return None if kernels is _native else kernels


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
    if (kernels := _kernels(x)) is not None:
        return kernels.encode(x, cmp, bits, nan_code)
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


def fused_encode(
    name: str,
    x: torch.Tensor,
    borders: torch.Tensor,
    bits: int,
    right: bool | Sequence[bool] = False,
    nan_code: int = 0,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(``f(x)``, ``encode(x, ...)``) in one pass for registry function `name` ('silu' or 'gelu') where the
    selected backend has a fused kernel whose output is bit-identical to torch's here, else None.

    Native (CPU): SiLU, see `silu_encode`. Triton: SiLU and GELU on contiguous fp32/fp16/bf16 input, each
    used only after a first-use check against torch's kernel per function, dtype and device
    (`tightfit.fewbit._triton.fused_ok`).
    """
    if name == "silu" and (fused := silu_encode(x, borders, bits, right, nan_code)) is not None:
        return fused
    if not x.is_contiguous() or (tri := _triton_for(x)) is None or name not in tri.FUSED:
        return None
    bits = _check_table(borders, bits, nan_code)
    return tri.fused_forward(name, x, compare_borders(borders, x.dtype, right), bits, nan_code)


def decode_mul(
    packed: torch.Tensor,
    levels: torch.Tensor,
    grad: torch.Tensor,
    bits: int,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """grad * levels[code] (levels rounded to grad's dtype), contiguous, grad's shape. With `scale` (same
    shape and dtype): ``levels[code] * (grad * scale)``, exactly as those two torch products round, in
    one pass (a gated unit's backward) instead of a temporary for ``grad * scale``.

    A `scale` of another shape, dtype or device raises ValueError on every backend (no broadcasting or
    type promotion: the op's contract does not depend on the backend); form ``grad * scale`` first.
    """
    bits = check_bits(bits)
    if scale is not None and (
        scale.shape != grad.shape or scale.dtype != grad.dtype or scale.device != grad.device
    ):
        raise ValueError(
            f"decode_mul: scale must have grad's shape, dtype and device ({tuple(grad.shape)}, {grad.dtype}, "
            f"{grad.device}), got ({tuple(scale.shape)}, {scale.dtype}, {scale.device}); pass "
            "scale=None with grad * scale instead"
        )
    if (kernels := _kernels(grad)) is not None:
        return kernels.decode_mul(packed, levels, grad, bits, scale)
    return _decode_mul_torch(packed, levels, grad, bits, scale)
