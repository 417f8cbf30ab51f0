"""Randomized linear layers (Bershatsky et al. 2022): a linear layer keeps a random sketch S·X of its input
and computes an unbiased estimate of the weight gradient; the input gradient stays exact.

`RandomizedLinear` / `randomized_linear` (also as `tightfit.nn` / `tightfit.functional`), `Sketch` +
`tightfit.convert_` (whole models, shared inputs handled; pass ``example=batch`` to measure the real peak
change), `LayerSeed` (per-layer seeds that draw no random number), `variance` (sketch vs minibatch-SGD
noise, and the smallest safe ratio per layer).
"""

from tightfit._lazy import lazy_getattr

_NAMES = {
    "RandomizedLinear": "modules",
    "RandomizedConv1D": "modules",
    "randomized_linear": "functional",
    "Sketch": "config",
    "SKETCHES": "sketches",
    "variance": "diagnostics",
    "VarianceReport": "diagnostics",
    "LayerVariance": "diagnostics",
    "LayerSeed": "seeding",
    "StepClock": "seeding",
}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)
