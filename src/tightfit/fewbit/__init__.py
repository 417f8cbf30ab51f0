"""Few-bit activation gradients (Novikov et al. 2022): a pointwise nonlinearity keeps a b-bit code per element
instead of its input, and its backward multiplies by an optimal piecewise-constant fit of the derivative.

Layers: `fit` / `get_table` (optimal tables by dynamic programming, shipped for bits 1-8), `codec` (exact
b-bit packing), `ops` / `gated` (autograd ops, fused SwiGLU/GEGLU), `modules` / `functional` (drop-ins, also
as `tightfit.nn` and `tightfit.functional`), `FewBit` + `tightfit.convert_` (whole models), `calibrate`.
"""

from tightfit._lazy import lazy_getattr

# NOTE: `fit` and `calibrate` name both a submodule and its function. Importing the functions here binds
# the package attributes to them for good (a later `import tightfit.fewbit.fit` does not rebind).
from tightfit.fewbit.calibrate import calibrate
from tightfit.fewbit.fit import fit

_NAMES = {
    # tables
    "get_table": "tables",
    "Table": "tables",
    "Calibration": "calibrate",
    "ACTIVATIONS": "activations",
    "spec_for_module": "activations",
    "spec_for_name": "activations",
    # ops and configuration
    "FewBit": "config",
    "swiglu": "gated",
    "geglu": "gated",
    "FewBitGatedMLP": "gated",
    "convert_fewbit": "convert",
}
__all__ = ["fit", "calibrate", *_NAMES]
__getattr__ = lazy_getattr(__name__, _NAMES)
