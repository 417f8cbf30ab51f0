"""Few-bit activation gradients (Novikov et al. 2022): a pointwise nonlinearity keeps a b-bit code per element
instead of its input, and its backward multiplies by an optimal piecewise-constant fit of the derivative.

Layers: `tables` (the `Table` data, exact and shipped tables for bits 1-8), `fit` (optimal tables by
dynamic programming), `lookup.get_table` (which table an op gets), `codec` (exact b-bit packing and
the backend choice, `backend()`: native C on the CPU, Triton on CUDA, pure torch), `ops` /
`gated` (autograd ops, fused SwiGLU/GEGLU), `modules` / `functional` (drop-ins, also as `tightfit.nn` and
`tightfit.functional`), `FewBit` + `tightfit.convert_` (whole models), `calibrate`.
"""

from tightfit._lazy import lazy_getattr

# NOTE: `fit` and `calibrate` name both a submodule and its function. Importing the functions here binds
# the package attributes to them for good (a later `import tightfit.fewbit.fit` does not rebind).
from tightfit.fewbit.calibrate import calibrate
from tightfit.fewbit.fit import fit

_NAMES = {
    # tables
    "get_table": "lookup",
    "Table": "tables",
    "Calibration": "calibrate",
    "ACTIVATIONS": "activations",
    "spec_for_module": "activations",
    "spec_for_name": "activations",
    # ops and configuration
    "backend": "codec",
    "backend_notes": "codec",
    "FewBit": "config",
    "swiglu": "gated",
    "geglu": "gated",
    "FewBitGatedMLP": "gated",
}
__all__ = ["fit", "calibrate", *_NAMES]
__getattr__ = lazy_getattr(__name__, _NAMES)
