"""The few-bit activation op: exact forward, b-bit saved codes, table-gather backward.

``y = f(x)`` is computed by the very torch call the original module makes, so y is bit-identical to it.
What is saved for backward is only the packed code of x (``ceil(n*bits/8)`` bytes, see
`tightfit.fewbit.codec`) plus the table's levels (``2**bits`` values, shared between calls). The backward
returns ``levels[code] * grad`` in the gradient's dtype (levels first rounded to that dtype).

The kernels are ``torch.library`` custom ops (``tightfit::fewbit_forward``, ``tightfit::fewbit_backward``)
with fake kernels, wrapped in a new-style ``autograd.Function`` (custom-op autograd does not compose with
``torch.func.grad``). So it works under ``torch.compile(fullgraph=True)`` (the op stays opaque there: the
forward keeps calling eager torch, which is what keeps it identical), ``torch.func.grad`` and autocast (it
runs in the dtype it receives).

NOTE (double backward): the backward is piecewise constant in x, so ``d(grad_x)/dx`` would silently be 0.
A backward run with ``create_graph=True`` therefore raises a RuntimeError naming this op, instead of
building a graph that gives a wrong second derivative. (``torch.func.grad`` builds such graphs for first
derivatives too: under functorch a single ``grad``/``vjp``/``jacrev`` works, and nested transforms
(``grad(grad(f))``, ``hessian``) raise the same error.)
"""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from tightfit.fewbit import codec
from tightfit.fewbit.activations import spec_for_name
from tightfit.fewbit.lookup import get_table

__all__ = [
    "fewbit_apply",
    "apply_tensors",
    "apply_named",
    "named_table_constants",
    "table_tensors",
    "cached_table_tensors",
    "register_forward",
    "forward_key",
    "forward_and_encode",
    "on_device",
    "named_tensors",
    "DOUBLE_BACKWARD_ERROR",
]

DOUBLE_BACKWARD_ERROR = (
    "tightfit few-bit activations do not support double backward (create_graph=True then differentiating "
    "the gradient): the saved b-bit code makes the backward piecewise constant in x, so a second "
    "derivative would silently be wrong. Use the torch activation (tightfit.convert_ with filter_fn, or "
    "the plain torch.nn module) where second derivatives are needed."
)

# Forwards by key: a custom op can only take strings, numbers and tensors, so the exact torch forward is
# looked up here. Keys are deterministic ("gelu:{}"), so compiled graphs and pickled configs stay valid.
_FORWARDS: dict[str, Callable[[Tensor], Tensor]] = {}


def forward_key(name: str, params: dict[str, Any] | None = None) -> str:
    """The registry key of the forward `name` with keyword parameters `params`."""
    return f"{name}:{json.dumps(params or {}, sort_keys=True)}"


def register_forward(key: str, fn: Callable[[Tensor], Tensor]) -> str:
    """Make `fn` (x -> f(x), pointwise, out of place) callable by the custom op under `key`."""
    _FORWARDS.setdefault(key, fn)  # keys name the math: a second registration of the same key is a no-op
    return key


# forwards that a backend may fuse with their encoding (codec.fused_encode): key -> registry name
_FUSED_KEYS = {forward_key("silu"): "silu", forward_key("gelu"): "gelu"}


def _lookup(key: str) -> Callable[[Tensor], Tensor]:
    try:
        return _FORWARDS[key]
    except KeyError:
        raise KeyError(f"no few-bit forward registered under {key!r}; call register_forward first") from None


def forward_and_encode(
    x: Tensor, key: str, borders: Tensor, bits: int, right: list[bool], nan_code: int
) -> tuple[Tensor, Tensor]:
    """(f(x), packed code of x): one fused pass where the backend has one bit-identical to torch's f
    (native: SiLU; Triton: SiLU, GELU; see `codec.fused_encode`), else torch's f followed by
    `codec.encode`."""
    name = _FUSED_KEYS.get(key)
    fused = None if name is None else codec.fused_encode(name, x, borders, bits, right, nan_code)
    if fused is not None:
        return fused
    return _lookup(key)(x), codec.encode(x, borders, bits, right, nan_code)


# ---------------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("tightfit::fewbit_forward", mutates_args=())
def _fewbit_forward(
    x: Tensor, key: str, borders: Tensor, levels: Tensor, bits: int, right: list[bool], nan_code: int
) -> tuple[Tensor, Tensor]:
    y, packed = forward_and_encode(x, key, borders, bits, right, nan_code)
    if y is x or (y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() and y.numel()):
        y = y.clone()  # a custom op may not return its input
    return y, packed


@_fewbit_forward.register_fake
def _(
    x: Tensor, key: str, borders: Tensor, levels: Tensor, bits: int, right: list[bool], nan_code: int
) -> tuple[Tensor, Tensor]:
    y = _lookup(key)(x)  # pointwise torch ops give the real output's dtype and strides on fake tensors
    return y, x.new_empty(((x.numel() * bits) + 7) // 8, dtype=torch.uint8)


@torch.library.custom_op("tightfit::fewbit_backward", mutates_args=())
def _fewbit_backward(packed: Tensor, levels: Tensor, grad: Tensor, bits: int, scale: Tensor | None) -> Tensor:
    return codec.decode_mul(packed, levels, grad, bits, scale)


@_fewbit_backward.register_fake
def _(packed: Tensor, levels: Tensor, grad: Tensor, bits: int, scale: Tensor | None) -> Tensor:
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)


def _functorch_active(t: Tensor) -> bool:
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def backward_gather(
    packed: Tensor, levels: Tensor, grad: Tensor, bits: int, scale: Tensor | None = None
) -> Tensor:
    """levels[code] * grad (``* (grad * scale)`` with `scale`). Raises when called to build a graph for a
    second derivative (module NOTE).

    ``torch.func.grad`` always builds such a graph even for first derivatives, so under functorch only
    nested transforms (level > 1) raise.
    """
    if torch.is_grad_enabled():
        if not _functorch_active(grad):
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        level = torch._C._functorch.maybe_current_level()
        if level is not None and level > 1:  # grad(grad(f)), hessian, jacfwd(grad(f)), ...
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
    return _fewbit_backward(packed, levels, grad, bits, scale)


class _FewBitFunction(torch.autograd.Function):
    """New-style autograd.Function (setup_context): works with torch.func.grad, unlike custom-op autograd."""

    @staticmethod
    def forward(
        x: Tensor, key: str, borders: Tensor, levels: Tensor, bits: int, right: list[bool], nan_code: int
    ) -> Any:
        return _fewbit_forward(x, key, borders, levels, bits, right, nan_code)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        x, _key, _borders, levels, bits, _right, _nan_code = inputs
        ctx.save_for_backward(output[1], levels)
        ctx.mark_non_differentiable(output[1])
        ctx.bits = bits
        ctx.x_dtype = x.dtype

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, _grad_packed: Tensor | None) -> tuple[Any, ...]:
        packed, levels = ctx.saved_tensors
        if grad_y.dtype != ctx.x_dtype:
            grad_y = grad_y.to(ctx.x_dtype)
        return backward_gather(packed, levels, grad_y, ctx.bits), None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# Python entry point
# ---------------------------------------------------------------------------------------------------


def fewbit_apply(
    x: Tensor,
    key: str,
    borders: Tensor,
    levels: Tensor,
    bits: int,
    right: bool | Sequence[bool] = False,
    nan_code: int = 0,
) -> Tensor:
    """f(x) with a few-bit backward; f is the forward registered under `key` (`register_forward`).

    `borders`/`levels`/`right`/`nan_code` form a table (`tightfit.fewbit.tables.Table`; codes as in
    `tightfit.fewbit.codec`).

    Without autograd (no grad mode, or x does not require grad) this is just ``f(x)``: no codes are made.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a tensor, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise TypeError(f"few-bit activations need a floating-point input, got {x.dtype}")
    if len(levels) > 1 << bits or len(levels) != len(borders) + 1:
        raise ValueError(f"a {bits}-bit table needs len(levels) == len(borders) + 1 <= {1 << bits}")
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _lookup(key)(x)
    flags = [bool(right)] * borders.numel() if isinstance(right, bool) else [bool(r) for r in right]
    y, _packed = _FewBitFunction.apply(x, key, borders, levels, bits, flags, int(nan_code))
    return y


FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def table_tensors(table: Any) -> dict[torch.dtype, tuple[Tensor, Tensor]]:
    """{input dtype: (borders to compare with, float64 levels)} of a `Table` on CPU, for every float dtype.

    Made once, eagerly (modules do it at construction), so compiled code only reads constants; made as
    normal tensors even under inference mode (a module built there must still train).
    """
    with torch.inference_mode(False):
        return {dt: (table.borders_for(dt), table.levels.clone()) for dt in FLOAT_DTYPES}


_table_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_table_tensors(table: Any) -> dict[torch.dtype, tuple[Tensor, Tensor]]:
    """`table_tensors` of `table`, made once per table (a Table is immutable) so that repeated calls with
    the same ``table=`` reuse the same constants (and their device copies, see `on_device`)."""
    if torch.compiler.is_compiling():
        return table_tensors(table)
    consts = _table_cache.get(table)
    if consts is None:
        consts = _table_cache.setdefault(table, table_tensors(table))
    return consts


def apply_tensors(
    x: Tensor,
    key: str,
    consts: dict[torch.dtype, tuple[Tensor, Tensor]],
    bits: int,
    right: Sequence[bool],
    nan_code: int = 0,
) -> Tensor:
    """`fewbit_apply` with the per-dtype constants of `table_tensors`."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a tensor, got {type(x).__name__}")
    if x.dtype not in consts:
        raise TypeError(f"few-bit activations need a float16/bfloat16/float32/float64 input, got {x.dtype}")
    borders, levels = _consts_on_device(consts, x.dtype, x.device)
    return fewbit_apply(x, key, borders, levels, bits, right, nan_code)


# CPU table constant -> {device: (its in-place version, its copy on that device)}
_device_copies: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _copy_to(t: Tensor, device: torch.device) -> Tensor:
    """The one host-to-device copy of a table constant (a function of its own so tests can count it).
    Callers that cache the copy make it outside inference mode (so that it stays usable in training)."""
    return t.to(device)


def on_device(t: Tensor, device: torch.device) -> Tensor:
    """Table constant `t` (borders or levels, on the CPU) on `device`: t itself where it is there already,
    else its copy there, made once per constant and device and reused while t lives unmodified.

    Copying the constants to a GPU on every op would be a host-to-device copy (a host sync) per op; the
    cache makes it one per module, dtype and device. Inside torch.compile or a dispatch mode (fake
    tensors) the copy is made each call and never cached. The copy is shared: do not modify it.
    """
    if t.device == device:
        return t
    return codec._cached(_device_copies, t, device, lambda: _copy_to(t, device))


def _consts_on_device(
    consts: dict[torch.dtype, tuple[Tensor, Tensor]], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The (borders, levels) of `table_tensors` constants `consts` for `dtype` inputs, on `device` (see
    `on_device`)."""
    borders, levels = consts[dtype]
    return on_device(borders, device), on_device(levels, device)


def named_tensors(
    borders: tuple[float, ...], levels: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(borders in the comparison dtype of `dtype` inputs, float64 levels) on `device`, from the plain
    constants of `named_table_constants`: made once per table, dtype and device and reused (see
    `on_device`), made afresh inside torch.compile or a dispatch mode."""
    cmp = torch.float64 if dtype == torch.float64 else torch.float32
    if torch.compiler.is_compiling() or codec._python_dispatch._get_current_dispatch_mode() is not None:
        return (torch.tensor(borders, dtype=cmp, device=device),
                torch.tensor(levels, dtype=torch.float64, device=device))
    return _named_tensors(borders, levels, cmp, torch.device(device))


@functools.lru_cache(maxsize=1024)
def _named_tensors(
    borders: tuple[float, ...], levels: tuple[float, ...], cmp: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    with torch.inference_mode(False), torch.no_grad():
        b = _copy_to(torch.tensor(borders, dtype=cmp), device)
        lv = _copy_to(torch.tensor(levels, dtype=torch.float64), device)
    return b, lv


@torch.compiler.assume_constant_result
def named_table_constants(
    name: str, bits: int, params: tuple[tuple[str, Any], ...], dtype: torch.dtype
) -> tuple[str, tuple[float, ...], tuple[float, ...], int, tuple[bool, ...], int]:
    """(forward key, borders for `dtype` inputs, levels, code bits, tie flags, NaN code) of a registry
    function.

    Plain Python constants (cached), so functional calls compile with fullgraph=True: torch.compile runs
    this once at trace time instead of tracing table loading.
    """
    return _named_table_constants(name, bits, params, dtype)


@functools.lru_cache(maxsize=1024)
def _named_table_constants(
    name: str, bits: int, params: tuple[tuple[str, Any], ...], dtype: torch.dtype
) -> tuple[str, tuple[float, ...], tuple[float, ...], int, tuple[bool, ...], int]:
    spec = spec_for_name(name)
    p = spec.params(**dict(params))
    key = register_forward(forward_key(spec.name, p), functools.partial(spec.fn, **p))
    t = get_table(spec.name, bits, **p)
    cmp_dtype = dtype if dtype in FLOAT_DTYPES else torch.float32
    borders = tuple(float(v) for v in t.borders_for(cmp_dtype).tolist())
    levels = tuple(float(v) for v in t.levels.tolist())
    return key, borders, levels, t.bits, tuple(t.right), int(t.nan_code)


def apply_named(x: Tensor, name: str, bits: int, params: dict[str, Any] | None = None) -> Tensor:
    """Registry function `name` with `params` applied to x with a `bits`-bit backward (functional API)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a tensor, got {type(x).__name__}")
    key, borders, levels, tbits, right, nan_code = named_table_constants(
        name, bits, tuple(sorted((params or {}).items())), x.dtype
    )
    b, lv = named_tensors(borders, levels, x.dtype, x.device)
    return fewbit_apply(x, key, b, lv, tbits, right, nan_code)
