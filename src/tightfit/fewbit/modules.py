"""Drop-in few-bit activation modules, named and called as in torch.nn, plus a generic one for any entry.

``tightfit.nn.GELU(bits=2)`` computes exactly ``torch.nn.GELU()``'s output and saves a 2-bit code of its
input for backward instead of the input (see `tightfit.fewbit.ops`). Each class takes torch's arguments
plus keyword-only ``bits`` (default `tightfit.fewbit.config.DEFAULT_BITS`) and ``table`` (a
`tightfit.fewbit.tables.Table`, e.g. a calibrated one). Piecewise-linear functions (ReLU, Hardtanh, ...)
use their exact table: 1 bit (2 for band functions) whatever ``bits`` asks for, and an exact gradient.

NOTE (inplace): ``inplace=`` is accepted for signature compatibility but never modifies the input: the
output is always a new tensor (fewbit's in-place ops clobbered their input, a bug we do not repeat).
The tables are plain attributes, not buffers: they are not in ``state_dict`` (so converting a model
keeps its keys) and ``model.to(dtype)`` does not round them.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from torch import Tensor, nn

from tightfit.fewbit.activations import spec_for_name
from tightfit.fewbit.config import DEFAULT_BITS
from tightfit.fewbit.lookup import get_table
from tightfit.fewbit.ops import apply_tensors, forward_key, register_forward, table_tensors
from tightfit.fewbit.tables import Table

__all__ = [
    "FewBitActivation",
    # torch.nn names
    "GELU",
    "SiLU",
    "Mish",
    "Tanh",
    "Sigmoid",
    "LogSigmoid",
    "Softplus",
    "Softsign",
    "Tanhshrink",
    "ELU",
    "CELU",
    "SELU",
    "Hardswish",
    "ReLU",
    "ReLU6",
    "LeakyReLU",
    "Threshold",
    "Hardtanh",
    "Hardsigmoid",
    "Hardshrink",
    "Softshrink",
]


class FewBitActivation(nn.Module):
    """Registry activation `name` (e.g. "gelu_new", "quick_gelu") with a `bits`-bit backward.

    Forward: exactly the registry's ``fn(x, **params)`` (the original op). Saved for backward:
    ceil(numel*table.bits/8) bytes plus the shared table. Backward: ``table.levels[code] * grad``.
    """

    def __init__(self, name: str, *, bits: int = DEFAULT_BITS, table: Table | None = None, **params: Any):
        super().__init__()
        spec = spec_for_name(name)
        self.name = spec.name
        self.params = spec.params(**params)
        self.bits = bits
        if table is None:
            table = get_table(spec.name, bits, **self.params)
        elif not isinstance(table, Table):
            raise TypeError(f"table must be a tightfit.fewbit.tables.Table, got {type(table).__name__}")
        self.table = table
        self._consts = table_tensors(table)  # per input dtype, made eagerly: compiled code reads constants
        self._key = register_forward(
            forward_key(spec.name, self.params), functools.partial(spec.fn, **self.params)
        )

    def forward(self, input: Tensor) -> Tensor:
        t = self.table
        return apply_tensors(input, self._key, self._consts, t.bits, t.right, t.nan_code)

    def _param_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.params.items())

    def extra_repr(self) -> str:
        p = self._param_repr()
        parts = [p] if p else []
        if type(self) is FewBitActivation:
            parts.insert(0, repr(self.name))
        parts.append(f"bits={self.bits}")
        if self.table.exact:
            parts.append(f"exact {self.table.bits}-bit table")
        elif self.table.bits != self.bits:
            parts.append(f"table bits={self.table.bits}")
        return ", ".join(parts)


def _inplace_ok(inplace: bool) -> None:
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")


class GELU(FewBitActivation):
    """torch.nn.GELU(approximate='none'|'tanh') with a few-bit backward."""

    def __init__(self, approximate: str = "none", *, bits: int = DEFAULT_BITS, table: Table | None = None):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU approximate must be 'none' or 'tanh', got {approximate!r}")
        super().__init__("gelu" if approximate == "none" else "gelu_tanh", bits=bits, table=table)
        self.approximate = approximate

    def _param_repr(self) -> str:
        return f"approximate={self.approximate!r}" if self.approximate != "none" else ""


def _simple(name: str, torch_name: str, inplace_arg: bool) -> type[FewBitActivation]:
    if inplace_arg:

        def __init__(
            self: FewBitActivation,
            inplace: bool = False,
            *,
            bits: int = DEFAULT_BITS,
            table: Table | None = None,
        ) -> None:
            _inplace_ok(inplace)
            FewBitActivation.__init__(self, name, bits=bits, table=table)
            self.inplace = inplace
    else:

        def __init__(
            self: FewBitActivation,
            *,
            bits: int = DEFAULT_BITS,  # type: ignore[misc]
            table: Table | None = None,
        ) -> None:
            FewBitActivation.__init__(self, name, bits=bits, table=table)

    doc = f"torch.nn.{torch_name} with a few-bit backward" + (
        " (inplace is accepted, never applied)." if inplace_arg else "."
    )
    return type(
        torch_name, (FewBitActivation,), {"__init__": __init__, "__doc__": doc, "__module__": __name__}
    )


SiLU = _simple("silu", "SiLU", True)
Mish = _simple("mish", "Mish", True)
Tanh = _simple("tanh", "Tanh", False)
Sigmoid = _simple("sigmoid", "Sigmoid", False)
LogSigmoid = _simple("logsigmoid", "LogSigmoid", False)
Softsign = _simple("softsign", "Softsign", False)
Tanhshrink = _simple("tanhshrink", "Tanhshrink", False)
SELU = _simple("selu", "SELU", True)
Hardswish = _simple("hardswish", "Hardswish", True)
ReLU = _simple("relu", "ReLU", True)
ReLU6 = _simple("relu6", "ReLU6", True)
Hardsigmoid = _simple("hardsigmoid", "Hardsigmoid", True)


class ELU(FewBitActivation):
    """torch.nn.ELU(alpha=1.0, inplace=False) with a few-bit backward (inplace never applied)."""

    def __init__(
        self,
        alpha: float = 1.0,
        inplace: bool = False,
        *,
        bits: int = DEFAULT_BITS,
        table: Table | None = None,
    ):
        _inplace_ok(inplace)
        super().__init__("elu", bits=bits, table=table, alpha=alpha)
        self.alpha, self.inplace = alpha, inplace


class CELU(FewBitActivation):
    """torch.nn.CELU(alpha=1.0, inplace=False) with a few-bit backward (inplace never applied)."""

    def __init__(
        self,
        alpha: float = 1.0,
        inplace: bool = False,
        *,
        bits: int = DEFAULT_BITS,
        table: Table | None = None,
    ):
        _inplace_ok(inplace)
        super().__init__("celu", bits=bits, table=table, alpha=alpha)
        self.alpha, self.inplace = alpha, inplace


class Softplus(FewBitActivation):
    """torch.nn.Softplus(beta=1.0, threshold=20.0) with a few-bit backward."""

    def __init__(
        self,
        beta: float = 1.0,
        threshold: float = 20.0,
        *,
        bits: int = DEFAULT_BITS,
        table: Table | None = None,
    ):
        super().__init__("softplus", bits=bits, table=table, beta=beta, threshold=threshold)
        self.beta, self.threshold = beta, threshold


class LeakyReLU(FewBitActivation):
    """torch.nn.LeakyReLU(negative_slope=0.01, inplace=False): exact 1-bit backward (inplace not applied)."""

    def __init__(
        self,
        negative_slope: float = 0.01,
        inplace: bool = False,
        *,
        bits: int = DEFAULT_BITS,
        table: Table | None = None,
    ):
        _inplace_ok(inplace)
        super().__init__("leaky_relu", bits=bits, table=table, negative_slope=negative_slope)
        self.negative_slope, self.inplace = negative_slope, inplace


class Threshold(FewBitActivation):
    """torch.nn.Threshold(threshold, value, inplace=False): exact 1-bit backward (inplace never applied)."""

    def __init__(
        self,
        threshold: float,
        value: float,
        inplace: bool = False,
        *,
        bits: int = DEFAULT_BITS,
        table: Table | None = None,
    ):
        _inplace_ok(inplace)
        super().__init__("threshold", bits=bits, table=table, threshold=threshold, value=value)
        self.threshold, self.value, self.inplace = threshold, value, inplace


class Hardtanh(FewBitActivation):
    """torch.nn.Hardtanh(min_val=-1.0, max_val=1.0, inplace=False): exact 2-bit backward."""

    def __init__(
        self,
        min_val: float = -1.0,
        max_val: float = 1.0,
        inplace: bool = False,
        min_value: float | None = None,
        max_value: float | None = None,
        *,
        bits: int = DEFAULT_BITS,
        table: Table | None = None,
    ):
        _inplace_ok(inplace)
        if min_value is not None or max_value is not None:  # torch's deprecated spellings, same meaning
            warnings.warn(
                "Hardtanh: min_value/max_value are deprecated, use min_val/max_val",
                FutureWarning,
                stacklevel=2,
            )
            min_val = min_val if min_value is None else min_value
            max_val = max_val if max_value is None else max_value
        super().__init__("hardtanh", bits=bits, table=table, min_val=min_val, max_val=max_val)
        self.min_val, self.max_val, self.inplace = min_val, max_val, inplace


class Hardshrink(FewBitActivation):
    """torch.nn.Hardshrink(lambd=0.5): exact 2-bit backward."""

    def __init__(self, lambd: float = 0.5, *, bits: int = DEFAULT_BITS, table: Table | None = None):
        super().__init__("hardshrink", bits=bits, table=table, lambd=lambd)
        self.lambd = lambd


class Softshrink(FewBitActivation):
    """torch.nn.Softshrink(lambd=0.5): exact 2-bit backward."""

    def __init__(self, lambd: float = 0.5, *, bits: int = DEFAULT_BITS, table: Table | None = None):
        super().__init__("softshrink", bits=bits, table=table, lambd=lambd)
        self.lambd = lambd
