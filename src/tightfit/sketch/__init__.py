"""Randomized linear layers (Bershatsky et al. 2022): a linear layer keeps a random sketch S·X of its input
and computes an unbiased estimate of the weight gradient; the input gradient stays exact.

`RandomizedLinear` / `randomized_linear` (also as `tightfit.nn` / `tightfit.functional`), `Sketch` +
`tightfit.convert_` (whole models, shared inputs handled), `variance` (sketch vs minibatch-SGD noise, and the
smallest safe ratio per layer).
"""

from tightfit._lazy import lazy_getattr

_NAMES = {
    "RandomizedLinear": "modules",
    "randomized_linear": "functional",
    "Sketch": "config",
    "variance": "variance",
    "convert_sketch": "convert",
}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)
