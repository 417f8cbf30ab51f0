"""`tightfit.sketch.variance` resolves here (the package's lazy table); the code is in `diagnostics`.

NOTE: importing this submodule directly (``import tightfit.sketch.variance``) before the first attribute
access binds the *module* to ``tightfit.sketch.variance``; use ``tightfit.sketch.variance(...)`` or
``from tightfit.sketch.diagnostics import variance``.
"""

from tightfit.sketch.diagnostics import LayerVariance, VarianceReport, variance

__all__ = ["variance", "VarianceReport", "LayerVariance"]
