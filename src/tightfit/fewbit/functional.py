"""Functional few-bit activations: ``gelu(x, bits=2)``, ``silu``, ..., ``swiglu(a, b)``, ``geglu(a, b)``.

Same forward as torch.nn.functional (bit-identical), few-bit backward (see `tightfit.fewbit.ops`).
Tables are looked up once per (function, bits, parameters) and cached. ``inplace=`` is accepted where
torch has it and never modifies the input.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor

from tightfit.fewbit.activations import spec_for_name
from tightfit.fewbit.config import DEFAULT_BITS
from tightfit.fewbit.gated import geglu, swiglu
from tightfit.fewbit.ops import (
    apply_named,
    apply_tensors,
    cached_table_tensors,
    forward_key,
    register_forward,
)
from tightfit.fewbit.tables import Table

__all__ = [
    "activation",
    "gelu",
    "silu",
    "mish",
    "tanh",
    "sigmoid",
    "logsigmoid",
    "softplus",
    "softsign",
    "tanhshrink",
    "elu",
    "celu",
    "selu",
    "hardswish",
    "relu",
    "relu6",
    "leaky_relu",
    "threshold",
    "hardtanh",
    "hardsigmoid",
    "hardshrink",
    "softshrink",
    "swiglu",
    "geglu",
]


def activation(
    x: Tensor, name: str, bits: int = DEFAULT_BITS, table: Table | None = None, **params: Any
) -> Tensor:
    """Registry activation `name` (torch or ACT2FN name, e.g. "gelu_new") of x with a few-bit backward.

    With ``table=`` (e.g. calibrated) the table's tensors are made once per table and reused (inside
    torch.compile they are made on every call: prefer the module form,
    `tightfit.fewbit.modules.FewBitActivation`, there).
    """
    if table is None:
        return apply_named(x, name, bits, params)
    spec = spec_for_name(name)
    p = spec.params(**params)
    key = register_forward(forward_key(spec.name, p), functools.partial(spec.fn, **p))
    return apply_tensors(x, key, cached_table_tensors(table), table.bits, table.right, table.nan_code)


def _no_inplace(inplace: bool) -> None:
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")


def gelu(x: Tensor, bits: int = DEFAULT_BITS, approximate: str = "none") -> Tensor:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return activation(x, "gelu" if approximate == "none" else "gelu_tanh", bits)


def silu(x: Tensor, bits: int = DEFAULT_BITS, inplace: bool = False) -> Tensor:
    _no_inplace(inplace)
    return activation(x, "silu", bits)


def mish(x: Tensor, bits: int = DEFAULT_BITS, inplace: bool = False) -> Tensor:
    _no_inplace(inplace)
    return activation(x, "mish", bits)


def tanh(x: Tensor, bits: int = DEFAULT_BITS) -> Tensor:
    return activation(x, "tanh", bits)


def sigmoid(x: Tensor, bits: int = DEFAULT_BITS) -> Tensor:
    return activation(x, "sigmoid", bits)


def logsigmoid(x: Tensor, bits: int = DEFAULT_BITS) -> Tensor:
    return activation(x, "logsigmoid", bits)


def softplus(x: Tensor, bits: int = DEFAULT_BITS, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return activation(x, "softplus", bits, beta=beta, threshold=threshold)


def softsign(x: Tensor, bits: int = DEFAULT_BITS) -> Tensor:
    return activation(x, "softsign", bits)


def tanhshrink(x: Tensor, bits: int = DEFAULT_BITS) -> Tensor:
    return activation(x, "tanhshrink", bits)


def elu(x: Tensor, bits: int = DEFAULT_BITS, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    _no_inplace(inplace)
    return activation(x, "elu", bits, alpha=alpha)


def celu(x: Tensor, bits: int = DEFAULT_BITS, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    _no_inplace(inplace)
    return activation(x, "celu", bits, alpha=alpha)


def selu(x: Tensor, bits: int = DEFAULT_BITS, inplace: bool = False) -> Tensor:
    _no_inplace(inplace)
    return activation(x, "selu", bits)


def hardswish(x: Tensor, bits: int = DEFAULT_BITS, inplace: bool = False) -> Tensor:
    _no_inplace(inplace)
    return activation(x, "hardswish", bits)


def relu(x: Tensor, bits: int = DEFAULT_BITS, inplace: bool = False) -> Tensor:
    _no_inplace(inplace)
    return activation(x, "relu", bits)


def relu6(x: Tensor, bits: int = DEFAULT_BITS, inplace: bool = False) -> Tensor:
    _no_inplace(inplace)
    return activation(x, "relu6", bits)


def leaky_relu(
    x: Tensor, negative_slope: float = 0.01, inplace: bool = False, bits: int = DEFAULT_BITS
) -> Tensor:
    _no_inplace(inplace)
    return activation(x, "leaky_relu", bits, negative_slope=negative_slope)


def threshold(
    x: Tensor, threshold: float, value: float, inplace: bool = False, bits: int = DEFAULT_BITS
) -> Tensor:
    _no_inplace(inplace)
    return activation(x, "threshold", bits, threshold=threshold, value=value)


def hardtanh(
    x: Tensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False, bits: int = DEFAULT_BITS
) -> Tensor:
    _no_inplace(inplace)
    return activation(x, "hardtanh", bits, min_val=min_val, max_val=max_val)


def hardsigmoid(x: Tensor, bits: int = DEFAULT_BITS, inplace: bool = False) -> Tensor:
    _no_inplace(inplace)
    return activation(x, "hardsigmoid", bits)


def hardshrink(x: Tensor, lambd: float = 0.5, bits: int = DEFAULT_BITS) -> Tensor:
    return activation(x, "hardshrink", bits, lambd=lambd)


def softshrink(x: Tensor, lambd: float = 0.5, bits: int = DEFAULT_BITS) -> Tensor:
    return activation(x, "softshrink", bits, lambd=lambd)
