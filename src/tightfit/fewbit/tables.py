"""Derivative tables: what a few-bit op needs to encode x and to rebuild f'(x) in the backward.

A :class:`Table` has sorted ``borders`` t_0 <= ... <= t_{m-1} and ``levels`` l_0..l_m. An input x gets
the code

    code(x) = Σ_i [x > t_i]   if not right[i]     (x == t_i goes to the piece BELOW t_i)
            + Σ_i [x >= t_i]  if right[i]         (x == t_i goes to the piece ABOVE t_i)

and the backward multiplies the incoming gradient by ``levels[code]``. When all ``right`` flags are
equal this is exactly ``torch.bucketize(x, borders, right=flag)`` (``Table.bucketize_right``); band
functions need mixed flags (hardtanh'(x) is 0 at both x = min_val and x = max_val), so the general rule
is the sum of comparisons above (``Table.encode``). The flags are chosen so that piecewise-linear tables
give torch's derivative exactly, kinks included (relu'(0) = 0, hardtanh'(±1) = 0, hardshrink'(±λ) = 0).
Fitted tables use one flag for all borders. A NaN input gets the code ``nan_code``: for exact tables
the piece whose level torch's own backward gives at NaN (it differs between ops: relu 1, hardsigmoid
0; for band functions torch's vectorised kernel gives 0 and its scalar tail 1, and we follow the former),
0 for fitted tables (torch gives NaN there; the loss is NaN anyway when an activation input is).

NOTE (dtype): compare ``x.to(compare_dtype(x.dtype))`` (float32 for float16/bfloat16, exact widening;
x's dtype otherwise) with ``table.borders_for(x.dtype)``. That reproduces torch's kernels bit for bit,
which treat their scalar parameters in one of two ways (``Table.border_rounding``): "opmath" (threshold,
hardtanh: a bfloat16 x = 0.10009765625 is above threshold 0.1 = float32(0.1)) or "input" (hardshrink,
softshrink: lambd is first rounded to x's dtype, so |x| = bfloat16(0.3) is inside the band). For float32
and float64 inputs both are simply ``borders.to(x.dtype)``. ``Table.encode`` is the reference.

This module holds the data: the `Table` type, ``exact_table`` for piecewise-linear functions (1 bit for
one kink, 2 bits for bands: ``table.bits`` is the code width actually needed) and the shipped tables
(``data/tables.json``, made by ``scripts/make_fewbit_tables.py``, loaded by ``load_shipped``). Which
table an op gets (shipped, exact or fitted) is decided by `tightfit.fewbit.lookup.get_table`.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from torch import Tensor

from tightfit.fewbit._bits import VALID_BITS
from tightfit.fewbit.activations import spec_for_name

__all__ = ["Table", "compare_dtype", "exact_table", "load_shipped", "tie_flags", "SHIPPED_BITS"]

SHIPPED_BITS = VALID_BITS  # the data file holds a fitted table for every valid code width
DATA_FILE = "tables.json"


def compare_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which x and the borders are compared: torch's opmath type (see the NOTE above)."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype if dtype.is_floating_point else torch.float64


@dataclass(frozen=True, eq=False)
class Table:
    """A piecewise-constant derivative table (see the module docstring for the encoding rule).

    ``error`` is E = ∫(f' − q)² w / ∫w under the weight ``weight`` it was made for (0 for exact tables);
    ``bits`` is the code width needed (len(levels) <= 2**bits); ``exact`` means q == f' everywhere with
    torch's conventions at kinks; ``right[i]`` says whether x == borders[i] belongs to the piece above.
    """

    borders: Tensor
    levels: Tensor
    error: float
    bits: int
    exact: bool = False
    right: tuple[bool, ...] = ()
    name: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    weight: str = "normal(mean=0, std=1)"
    border_rounding: str = "opmath"
    nan_code: int = 0

    def __post_init__(self) -> None:
        if self.border_rounding not in ("opmath", "input"):
            raise ValueError(f"border_rounding must be 'opmath' or 'input', got {self.border_rounding!r}")
        b = torch.as_tensor(self.borders, dtype=torch.float64).detach().flatten()
        lv = torch.as_tensor(self.levels, dtype=torch.float64).detach().flatten()
        object.__setattr__(self, "borders", b)
        object.__setattr__(self, "levels", lv)
        if lv.numel() != b.numel() + 1:
            raise ValueError(f"a table needs len(levels) == len(borders) + 1, got {lv.numel()}, {b.numel()}")
        if b.numel() and bool((b[1:] < b[:-1]).any()):
            raise ValueError("table borders must be sorted")
        if not (torch.isfinite(b).all() and torch.isfinite(lv).all()):
            raise ValueError("table borders and levels must be finite")
        if lv.numel() > (1 << int(self.bits)):
            raise ValueError(f"{lv.numel()} levels do not fit in {self.bits} bits")
        if not 0 <= int(self.nan_code) < lv.numel():
            raise ValueError(f"nan_code must index a level, got {self.nan_code} for {lv.numel()} levels")
        right = tuple(bool(r) for r in self.right) if self.right else (False,) * b.numel()
        if len(right) != b.numel():
            raise ValueError(f"right needs one flag per border, got {len(right)} for {b.numel()}")
        object.__setattr__(self, "right", right)

    @property
    def num_levels(self) -> int:
        return int(self.levels.numel())

    @property
    def bucketize_right(self) -> bool | None:
        """``torch.bucketize``'s ``right=`` reproducing :meth:`encode`, or None when the flags are mixed."""
        if all(self.right):
            return True
        if not any(self.right):
            return False
        return None

    def borders_for(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
        """The borders to compare with ``x.to(compare_dtype(dtype))``, for inputs of ``dtype``."""
        b = self.borders
        if self.border_rounding == "input" and dtype.is_floating_point:
            b = b.to(dtype)
        return b.to(device=device, dtype=compare_dtype(dtype))

    def encode(self, x: Tensor) -> Tensor:
        """Reference encoder: int64 codes in [0, len(levels)) (compares in ``compare_dtype(x.dtype)``)."""
        b = self.borders_for(x.dtype, x.device)
        x = x.to(b.dtype)
        flag = self.bucketize_right
        if flag is not None:
            code = torch.bucketize(x.contiguous(), b, right=flag)
        else:
            code = torch.zeros(x.shape, dtype=torch.int64, device=x.device)
            for t, r in zip(b, self.right):
                code += (x >= t) if r else (x > t)
        return torch.where(torch.isnan(x), self.nan_code, code)

    def decode(self, codes: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        """levels[codes]: the approximate derivative."""
        return self.levels.to(device=codes.device, dtype=dtype)[codes]

    def __call__(self, x: Tensor) -> Tensor:
        """q(x), the approximate derivative, in x's dtype."""
        return self.decode(self.encode(x), x.dtype if x.is_floating_point() else torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": dict(self.params),
            "bits": int(self.bits),
            "exact": bool(self.exact),
            "error": float(self.error),
            "weight": self.weight,
            "borders": [float(v) for v in self.borders.tolist()],
            "levels": [float(v) for v in self.levels.tolist()],
            "right": [bool(r) for r in self.right],
            "border_rounding": self.border_rounding,
            "nan_code": int(self.nan_code),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Table:
        return cls(
            borders=torch.tensor(d["borders"], dtype=torch.float64),
            levels=torch.tensor(d["levels"], dtype=torch.float64),
            error=float(d["error"]),
            bits=int(d["bits"]),
            exact=bool(d.get("exact", False)),
            right=tuple(d.get("right", ())),
            name=d.get("name"),
            params=dict(d.get("params", {})),
            weight=d.get("weight", "normal(mean=0, std=1)"),
            border_rounding=d.get("border_rounding", "opmath"),
            nan_code=int(d.get("nan_code", 0)),
        )

    def __repr__(self) -> str:
        kind = "exact" if self.exact else f"error={self.error:.3e}"
        return f"Table({self.name!r}, bits={self.bits}, levels={self.num_levels}, {kind})"


def tie_flags(fn: Callable[[Tensor], Tensor], borders: Any, levels: Any) -> tuple[bool, ...]:
    """For each border t_i: True when torch's f'(t_i) is closer to the level above than to the one below."""
    b = torch.as_tensor(borders, dtype=torch.float64).flatten()
    lv = torch.as_tensor(levels, dtype=torch.float64).flatten()
    if b.numel() == 0:
        return ()
    x = b.clone().requires_grad_(True)
    with torch.enable_grad():
        (d,) = torch.autograd.grad(fn(x).sum(), x)
    below, above = lv[:-1], lv[1:]
    return tuple(bool(v) for v in ((d - above).abs() < (d - below).abs()).tolist())


def exact_table(name: str, **params: Any) -> Table:
    """The exact table of a piecewise-linear registry function ("step" or "band" kind)."""
    spec = spec_for_name(name)
    if spec.kind == "smooth":
        raise ValueError(f"{spec.name} is not piecewise linear: use get_table/fit for a fitted table")
    p = spec.params(**params)
    borders = sorted(float(t) for t in spec.breaks(p))
    # One level per piece: f' at an interior point of it (torch's own backward, so exactly its value).
    pts = [borders[0] - 1.0, *[0.5 * (a + b) for a, b in zip(borders[:-1], borders[1:])], borders[-1] + 1.0]
    levels = spec.derivative(torch.tensor(pts, dtype=torch.float64), **p)
    fn = functools.partial(spec.fn, **p)
    bits = max(1, math.ceil(math.log2(len(pts))))
    # torch's f'(NaN) differs between ops (relu: 1, hardsigmoid: 0): NaN inputs get the code of that level.
    # For band functions (hardtanh, relu6, hardshrink, softshrink) torch's vectorised kernel gives 0 and its
    # scalar tail 1, so it depends on the element's position; we follow the vectorised body (most elements).
    at_nan = spec.derivative(torch.full((1024,), math.nan, dtype=torch.float64), **p)[:1]
    same = (levels == at_nan).nonzero()
    nan_code = int(same[0, 0]) if same.numel() else 0
    return Table(
        borders=torch.tensor(borders, dtype=torch.float64),
        levels=levels,
        error=0.0,
        bits=bits,
        exact=True,
        right=tie_flags(fn, borders, levels),
        name=spec.name,
        params=p,
        weight="any",
        border_rounding=spec.border_rounding,
        nan_code=nan_code,
    )


@functools.lru_cache(maxsize=1)
def load_shipped() -> dict[tuple[str, int], Table]:
    """The shipped tables, keyed by (registry name, bits). Empty if the data file is not there."""
    try:
        text = resources.files("tightfit.fewbit").joinpath("data", DATA_FILE).read_text()
    except (FileNotFoundError, ModuleNotFoundError):
        return {}
    data = json.loads(text)
    return {(d["name"], int(d["bits"])): Table.from_dict(d) for d in data["tables"]}


def table_summary(tables: Sequence[Table]) -> str:
    """A plain-text table of errors, one row per function, one column per bit width."""
    rows: dict[str, dict[int, Table]] = {}
    for t in tables:
        rows.setdefault(str(t.name), {})[t.bits] = t
    bits = sorted({t.bits for t in tables})
    head = f"{'function':<18}" + "".join(f"{b:>10d}" for b in bits)
    lines = [head]
    for name, byb in rows.items():
        cells = []
        for b in bits:
            t = byb.get(b)
            cells.append(f"{'':>10}" if t is None else f"{'exact':>10}" if t.exact else f"{t.error:>10.2e}")
        lines.append(f"{name:<18}" + "".join(cells))
    return "\n".join(lines)
