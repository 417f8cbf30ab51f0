"""Functional form: ``randomized_linear(x, weight, bias, ratio=0.2, sketch="gaussian")``."""

from __future__ import annotations

from torch import Tensor

from tightfit.sketch.ops import SketchShare, sketched_linear, validate_options

__all__ = ["randomized_linear"]


def randomized_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    ratio: float | None = None,
    k: int | None = None,
    sketch: str = "gaussian",
    blocks: int | None = None,
    min_tokens: int = 0,
    seed: Tensor | int | None = None,
    share: SketchShare | None = None,
) -> Tensor:
    """F.linear(input, weight, bias) that keeps a k-row sketch of the input for grad_W instead of the input.

    The sketch runs over all leading (token) dims: N = input.numel() // in_features, k = ratio·N (rounded up)
    or the given k. The forward output and grad_input are exact. grad_weight is an unbiased estimate
    (see tightfit.sketch.sketches for each sketch's variance). The seed is drawn from the global torch
    generator on every call unless given. With k >= N, or N < min_tokens, it runs exactly and warns.
    """
    validate_options(ratio, k, sketch, blocks)
    return sketched_linear(
        input, weight, bias, ratio=ratio, k=k, sketch=sketch, blocks=blocks, min_tokens=min_tokens, seed=seed,
        share=share,
    )
