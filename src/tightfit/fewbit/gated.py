"""Fused few-bit gated units: SwiGLU ``silu(a) * b`` and GEGLU ``gelu(a) * b`` (Llama/Gemma-style MLPs).

The product's backward needs ``grad_a = grad * b * f'(a)`` and ``grad_b = grad * f(a)``. What is saved:

======================  ================================================  ===========================
version                 saved for backward (n elements each)              bytes at fp32
======================  ================================================  ===========================
torch, unfused          a (for f'), f(a) and b (for the product)          12 n
this op (few-bit)       b, f(a), packed code of a (``bits`` per element)  8 n + ceil(n*bits/8)
exact recompute fused   a, b (recompute f and f' in the backward)         8 n
======================  ================================================  ===========================

So the honest accounting: the few-bit code replaces the saved ``a`` (12n -> 8n + n*bits/8 bytes against
unfused torch), but an exact recompute-style fused kernel already reaches 8n. The few-bit gated op does
not beat that: b and f(a) must be kept exactly for grad_b and grad_a's factor b. Its forward is
bit-identical to ``F.silu(a) * b`` (resp. ``F.gelu(a) * b``); grad_a = levels[code(a)] * (grad * b) and
grad_b = grad * f(a), both tested exactly against that formula.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tightfit.fewbit import codec
from tightfit.fewbit.activations import spec_for_name
from tightfit.fewbit.config import DEFAULT_BITS
from tightfit.fewbit.lookup import get_table
from tightfit.fewbit.ops import (
    _consts_on_device,
    _lookup,
    backward_gather,
    cached_table_tensors,
    forward_and_encode,
    forward_key,
    named_table_constants,
    named_tensors,
    register_forward,
    table_tensors,
)
from tightfit.fewbit.tables import Table

__all__ = ["swiglu", "geglu", "gated", "gated_saved_bytes", "FewBitGatedMLP"]


@torch.library.custom_op("tightfit::fewbit_gated_forward", mutates_args=())
def _gated_forward(
    a: Tensor,
    b: Tensor,
    key: str,
    borders: Tensor,
    levels: Tensor,
    bits: int,
    right: list[bool],
    nan_code: int,
) -> tuple[Tensor, Tensor, Tensor]:
    s, packed = forward_and_encode(a, key, borders, bits, right, nan_code)
    return s * b, s, packed


@_gated_forward.register_fake
def _(
    a: Tensor,
    b: Tensor,
    key: str,
    borders: Tensor,
    levels: Tensor,
    bits: int,
    right: list[bool],
    nan_code: int,
):
    s = _lookup(key)(a)
    return s * b, s, a.new_empty(((a.numel() * bits) + 7) // 8, dtype=torch.uint8)


class _GatedFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        a: Tensor,
        b: Tensor,
        key: str,
        borders: Tensor,
        levels: Tensor,
        bits: int,
        right: list[bool],
        nan_code: int,
    ) -> Any:
        return _gated_forward(a, b, key, borders, levels, bits, right, nan_code)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        _a, b, _key, _borders, levels, bits, _right, _nan_code = inputs
        _h, s, packed = output
        ctx.save_for_backward(b, s, packed, levels)
        ctx.mark_non_differentiable(s, packed)
        ctx.bits = bits

    @staticmethod
    def backward(ctx: Any, grad_h: Tensor, _gs: Any, _gp: Any) -> tuple[Any, ...]:
        b, s, packed, levels = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            if b.dtype == grad_h.dtype and b.shape == grad_h.shape:  # (grad_h * b) fused into the gather
                grad_a = backward_gather(packed, levels, grad_h, ctx.bits, scale=b)
            else:
                grad_a = backward_gather(packed, levels, grad_h * b, ctx.bits)
        if ctx.needs_input_grad[1]:
            grad_b = grad_h * s
        return grad_a, grad_b, None, None, None, None, None, None


def gated(a: Tensor, b: Tensor, name: str, bits: int = DEFAULT_BITS, table: Table | None = None) -> Tensor:
    """``f(a) * b`` for registry activation `name`, saving b, f(a) and a `bits`-bit code of a."""
    if a.shape != b.shape:
        raise ValueError(
            f"gated units need a and b of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if table is None:
        key, borders_c, levels_c, tbits, right, nan_code = named_table_constants(
            spec_for_name(name).name, bits, (), a.dtype
        )
        borders, levels = named_tensors(borders_c, levels_c, a.dtype, a.device)
    else:
        spec = spec_for_name(name)
        key = register_forward(forward_key(spec.name), spec.fn)
        borders, levels = _consts_on_device(cached_table_tensors(table), a.dtype, a.device)
        tbits, right, nan_code = table.bits, tuple(table.right), table.nan_code
    return _apply(a, b, key, borders, levels, tbits, right, nan_code)


def _apply(
    a: Tensor, b: Tensor, key: str, borders: Tensor, levels: Tensor, bits: int, right: Any, nan_code: int
) -> Tensor:
    if not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return _lookup(key)(a) * b
    return _GatedFunction.apply(a, b, key, borders, levels, bits, list(right), int(nan_code))[0]


def swiglu(a: Tensor, b: Tensor, bits: int = DEFAULT_BITS, table: Table | None = None) -> Tensor:
    """``F.silu(a) * b`` (bit-identical) with a few-bit code of a saved instead of a."""
    return gated(a, b, "silu", bits, table)


def geglu(
    a: Tensor, b: Tensor, bits: int = DEFAULT_BITS, approximate: str = "none", table: Table | None = None
) -> Tensor:
    """``F.gelu(a, approximate=...) * b`` (bit-identical) with a few-bit code of a saved instead of a."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return gated(a, b, "gelu" if approximate == "none" else "gelu_tanh", bits, table)


def gated_saved_bytes(n: int, bits: int, element_size: int = 4) -> dict[str, int]:
    """Bytes saved for backward by the three versions in the module docstring (tables excluded)."""
    return {
        "torch_unfused": 3 * n * element_size,
        "fewbit": 2 * n * element_size + codec.packed_nbytes(n, bits),
        "exact_recompute": 2 * n * element_size,
    }


class FewBitGatedMLP(torch.nn.Module):
    """``down_proj(f(gate_proj(x)) * up_proj(x))`` with the fused few-bit gated op (Llama-style MLPs).

    Built by `tightfit.convert_` from an MLP whose forward is exactly that expression; it holds the very
    same ``gate_proj``/``up_proj``/``down_proj`` (and the original ``act_fn``, parameter-free), so the
    state_dict keys and tensors are unchanged. Saved bytes: see the module docstring.
    """

    def __init__(
        self, original: torch.nn.Module, name: str, bits: int = DEFAULT_BITS, table: Table | None = None
    ):
        super().__init__()
        spec = spec_for_name(name)
        self.gate_proj = original.gate_proj
        self.up_proj = original.up_proj
        self.down_proj = original.down_proj
        self.act_fn = original.act_fn
        for attr in ("config", "hidden_size", "intermediate_size"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))
        self.name = spec.name
        self.bits = bits
        self.table = table if table is not None else get_table(spec.name, bits)
        self._key = register_forward(forward_key(spec.name), spec.fn)
        self._consts = table_tensors(self.table)  # per input dtype, made eagerly (compile reads constants)
        self.original_class = type(original).__name__

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.gate_proj(x), self.up_proj(x)
        if a.shape != b.shape:
            raise ValueError(
                f"gate_proj and up_proj outputs differ in shape: {tuple(a.shape)}, {tuple(b.shape)}"
            )
        borders, levels = _consts_on_device(self._consts, a.dtype, a.device)
        t = self.table
        return self.down_proj(_apply(a, b, self._key, borders, levels, t.bits, t.right, t.nan_code))

    def extra_repr(self) -> str:
        return f"{self.original_class}, act={self.name!r}, bits={self.bits}"
