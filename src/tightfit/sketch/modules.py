"""Drop-in modules: `RandomizedLinear` (nn.Linear's signature, init, state_dict) and a GPT-2 Conv1D form."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tightfit.sketch.ops import SketchShare, sketched_linear, validate_options
from tightfit.sketch.seeding import LayerSeed

__all__ = ["RandomizedLinear"]


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"RandomizedLinear needs a floating-point dtype (float32, bfloat16...), got {dtype}")


class _SketchOptions:
    """Options shared by the randomized modules (a mixin: keeps the forward code in one place)."""

    ratio: float | None
    k: int | None
    sketch: str
    blocks: int | None
    min_tokens: int
    share: SketchShare | None
    # None: each call draws its seed from the global CPU generator; a LayerSeed: from it, drawing nothing
    # (tightfit.sketch.seeding; the one-budget planner sets it)
    seeding: LayerSeed | None = None

    def _set_options(self, ratio, k, sketch, blocks, min_tokens, share) -> None:  # noqa: ANN001
        validate_options(ratio, k, sketch, blocks)
        if not isinstance(min_tokens, int) or min_tokens < 0:
            raise ValueError(f"min_tokens must be a non-negative int, got {min_tokens!r}")
        self.ratio, self.k, self.sketch, self.blocks, self.min_tokens = ratio, k, sketch, blocks, min_tokens
        self.share = share

    def _options_repr(self) -> str:
        size = f"ratio={self.ratio}" if self.k is None else f"k={self.k}"
        extra = f", blocks={self.blocks}" if self.blocks is not None else ""
        shared = ", shared" if self.share is not None else ""
        return f"{size}, sketch={self.sketch!r}{extra}{shared}"

    def _run(self, x: Tensor, weight_out_in: Tensor, bias: Tensor | None) -> Tensor:
        seed = self.seeding.draw() if self.seeding is not None and torch.is_grad_enabled() else None
        return sketched_linear(
            x, weight_out_in, bias, ratio=self.ratio, k=self.k, sketch=self.sketch, blocks=self.blocks,
            min_tokens=self.min_tokens, share=self.share, seed=seed,
        )


class RandomizedLinear(_SketchOptions, nn.Linear):
    """nn.Linear that keeps a sketch S·X (k = ratio·N rows over all leading dims) for grad_W, not X.

    Same parameters, init and state_dict keys as nn.Linear. The forward output and grad_input are exact.
    grad_weight is an unbiased estimate with extra variance (`tightfit.sketch.variance` measures it).
    Saved for backward: k·in_features elements in the compute dtype, plus an 8-byte seed. X is not saved.
    Sketches: "gaussian", "rademacher", "rows", "norm_rows" (see tightfit.sketch.sketches).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        ratio: float | None = None,
        k: int | None = None,
        sketch: str = "gaussian",
        blocks: int | None = None,
        min_tokens: int = 0,
        share: SketchShare | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_dtype(dtype)
        if ratio is None and k is None:
            raise ValueError("RandomizedLinear needs ratio= (fraction of token rows kept, in (0, 1]) or k=")
        validate_options(ratio, k, sketch, blocks)  # before allocating anything
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._set_options(ratio, k, sketch, blocks, min_tokens, share)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> RandomizedLinear:  # noqa: ANN003
        """A RandomizedLinear sharing `linear`'s Parameter objects (state_dict keys and values unchanged)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **options)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, input: Tensor) -> Tensor:
        return self._run(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._options_repr()}"


class RandomizedConv1D(_SketchOptions, nn.Module):
    """transformers' GPT-2 Conv1D (y = x @ W + b, W stored as in_features x out_features), randomized.

    Keeps the Conv1D parameter layout and names (`weight`, `bias`, `nf`), so state_dicts are unchanged.
    """

    def __init__(self, conv: nn.Module, **options) -> None:  # noqa: ANN003
        super().__init__()
        self._set_options(
            options.get("ratio"), options.get("k"), options.get("sketch", "gaussian"), options.get("blocks"),
            options.get("min_tokens", 0), options.get("share"),
        )
        self.nf = conv.nf
        self.nx = conv.weight.shape[0]
        self.weight = conv.weight
        self.bias = conv.bias
        self.train(conv.training)

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, self.weight.t(), self.bias)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, {self._options_repr()}"
