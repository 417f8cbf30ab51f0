"""Bit-pattern equality of float tensors: what "bit for bit" means in the few-bit checks and tests.

Its own module so that both the codec and the Triton kernels (`tightfit.fewbit._triton`) use it without
importing each other.
"""

from __future__ import annotations

import torch

__all__ = ["same_bits"]

_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b (float tensors) have the same shape, dtype and bit pattern at every element, a NaN
    matching any NaN (its sign and payload ignored) and nothing else. Unlike ``torch.equal``, -0.0 and
    +0.0 differ; unlike comparing ``nan_to_num``, an infinity differs from the largest finite value."""
    if a.shape != b.shape or a.dtype != b.dtype or a.dtype not in _INT_VIEW:
        return False
    it = _INT_VIEW[a.dtype]
    canon = torch.tensor(-1, dtype=it, device=a.device)  # all ones: itself a NaN, so no number maps there
    ab = torch.where(a.isnan(), canon, a.contiguous().view(it))
    bb = torch.where(b.isnan(), canon.to(b.device), b.contiguous().view(it))
    return bool(torch.equal(ab, bb.to(ab.device)))
