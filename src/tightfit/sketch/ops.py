"""The autograd op: a linear layer that saves a sketch S·X for grad_W instead of X, and its wrapper.

What is saved: S·X (k x d_in, in the compute dtype), the 8-byte seed, the weight (a parameter, no new
memory), and for ``norm_rows`` the k sampled indices. X is not saved. What is recomputed in backward: S,
from the seed. The forward output is exactly F.linear(X, W, b), and grad_X = G·W is exact. Only grad_W is
an estimate: (S·G)ᵀ(S·X), unbiased. grad_b = Σ_t g_t is exact.

NOTE (shared inputs): layers reading the same tensor (q/k/v projections of one LayerNorm output) each
keeping their own sketch would keep 3·k·d instead of the N·d that plain layers share. A `SketchShare`
lets them reuse one sketch (same seed, same S·X). Each grad_W stays unbiased, and the estimates of
the layers become correlated. Sharing is keyed on tensor identity and version, in eager mode only:
torch.compile traces each layer separately.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tightfit.sketch.sketches import (
    SKETCHES,
    SketchPlan,
    draw_seed,
    plan_sketch,
    sketch_grad_weight,
    sketch_input,
)

__all__ = ["SketchedLinearFunction", "SketchShare", "resolve_k", "validate_options", "sketched_linear"]


class SketchedLinearFunction(torch.autograd.Function):
    """y = F.linear(x, w, b), saving a precomputed sketch `sx` (and seed/idx) for an estimated grad_W."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, sx, seed, idx, kind: str, n: int, k: int, m: int):  # noqa: ANN001
        ctx.save_for_backward(sx, weight, seed, idx)
        ctx.plan = (kind, n, k, m)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, gy: Tensor):  # noqa: ANN205
        sx, weight, seed, idx = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        g2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = gy.matmul(weight.to(gy.dtype))
        if ctx.needs_input_grad[1]:
            grad_w = sketch_grad_weight(g2, sx, seed, SketchPlan(*ctx.plan), idx).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


class SketchShare:
    """Lets layers that read the same input tensor reuse one sketch. Holds weak references only to inputs:
    an entry disappears when its input tensor dies. Not copied by deepcopy/pickle (a fresh, empty one)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Any, int, tuple, SketchPlan, Tensor, Tensor, Tensor | None]] = {}
        self.hits = 0

    def lookup(self, x: Tensor, key: tuple) -> tuple[SketchPlan, Tensor, Tensor, Tensor | None] | None:
        entry = self._entries.get(id(x))
        if entry is None:
            return None
        ref, version, ekey, plan, seed, sx, idx = entry
        if ref() is not x or version != x._version or ekey != key:
            return None
        self.hits += 1
        return plan, seed, sx, idx

    def store(
        self, x: Tensor, key: tuple, plan: SketchPlan, seed: Tensor, sx: Tensor, idx: Tensor | None
    ) -> None:
        key_id = id(x)
        entries = self._entries

        def _drop(_ref: Any, key_id: int = key_id) -> None:
            entry = entries.get(key_id)
            if entry is not None and entry[0] is _ref:
                del entries[key_id]

        self._entries[key_id] = (weakref.ref(x, _drop), x._version, key, plan, seed, sx, idx)

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo: dict) -> SketchShare:
        return SketchShare()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def validate_options(ratio: float | None, k: int | None, sketch: str, blocks: int | None) -> None:
    """Raise a clear error for invalid sketch options (before any computation or model mutation)."""
    if ratio is None and k is None:
        raise ValueError("give ratio= (fraction of token rows to keep, in (0, 1]) or k= (rows to keep)")
    if ratio is not None and k is not None:
        raise ValueError(f"give either ratio= or k=, not both (got ratio={ratio}, k={k})")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive int (rows of the sketch), got {k!r}")
    if sketch not in SKETCHES:
        raise ValueError(f"unknown sketch {sketch!r}; valid: {', '.join(SKETCHES)}")
    if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1):
        raise ValueError(f"blocks must be None (automatic) or a positive int, got {blocks!r}")


def resolve_k(n: int, ratio: float | None, k: int | None, shape: tuple[int, ...] = ()) -> int:
    """Rows kept for N tokens: k, or ceil(ratio·N). A k larger than N is an error."""
    if k is not None:
        if k > n:
            raise ValueError(
                f"k={k} is larger than the number of tokens N={n} (product of the leading dims of the input "
                f"shape {tuple(shape)}); use k <= N, or ratio= to scale with N"
            )
        return k
    assert ratio is not None
    return max(1, min(n, math.ceil(ratio * n)))


def _warn_exact(n: int, k: int, min_tokens: int) -> None:
    if torch.compiler.is_compiling():
        return
    why = f"k={k} >= N={n}" if k >= n else f"N={n} < min_tokens={min_tokens}"
    warnings.warn(
        f"RandomizedLinear: {why}: a sketch would not be smaller than the input, using the exact linear "
        "(no memory saving for this call)",
        stacklevel=3,
    )


def sketched_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    ratio: float | None,
    k: int | None,
    sketch: str,
    blocks: int | None = None,
    min_tokens: int = 0,
    seed: Tensor | int | None = None,
    share: SketchShare | None = None,
) -> Tensor:
    """The implementation behind `randomized_linear` (options assumed validated)."""
    if not x.is_floating_point():
        raise TypeError(f"randomized_linear needs a floating-point input, got {x.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"randomized_linear needs a floating-point weight, got {weight.dtype}")
    d_in = weight.shape[1]
    if x.shape[-1] != d_in:
        raise ValueError(f"input has {x.shape[-1]} features in its last dim, the weight expects {d_in}")
    key_x = x
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # NOTE (autocast): linear runs in the autocast dtype; cast here so the sketch is kept in it too.
        dt = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return F.linear(x, weight, bias)  # no grad_W: F.linear does not keep X for it either
    n = x.numel() // d_in if d_in else 0
    kk = resolve_k(n, ratio, k, tuple(x.shape))
    if kk >= n or n < min_tokens:
        if not (ratio == 1 and k is None):
            _warn_exact(n, kk, min_tokens)
        return F.linear(x, weight, bias)
    x2 = x.detach().reshape(n, d_in)
    cached = None
    key = (sketch, kk, blocks, x.dtype)
    if share is not None and not torch.compiler.is_compiling():
        cached = share.lookup(key_x, key)
    if cached is not None:
        plan, seed, sx, idx = cached
    else:
        plan = plan_sketch(sketch, n, kk, blocks, d_in, weight.shape[0])
        if seed is None:
            seed = draw_seed()
        elif not isinstance(seed, Tensor):
            seed = torch.tensor(int(seed), dtype=torch.int64)
        with torch.no_grad():
            sx, idx = sketch_input(x2, seed, plan)
        if share is not None and not torch.compiler.is_compiling():
            share.store(key_x, key, plan, seed, sx, idx)
    return SketchedLinearFunction.apply(
        x, weight, bias, sx, seed, idx, plan.kind, plan.n, plan.k, plan.blocks
    )
