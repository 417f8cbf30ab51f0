"""Which derivative table a few-bit op gets: shipped, exact, or fitted (and cached).

`tightfit.fewbit.tables` holds the data (the `Table` type, exact tables, the shipped file) and
`tightfit.fewbit.fit` the algorithm; this module sits above both and holds only the policy:

- piecewise-linear functions get their exact table at any parameters (its ``bits`` may be below the
  request: one kink needs 1 bit, a band 2);
- smooth functions under the N(0,1) weight get the shipped table when their parameters are the defaults,
  otherwise a fit, kept in an LRU cache per (function, bits, parameters) so every module converted with
  the same settings shares one table;
- any other weight (e.g. ``Calibration.weight(path)``) gets a fresh fit, not cached: weights are
  arbitrary objects (samples, callables, histograms), not cache keys.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from tightfit.fewbit._bits import check_bits
from tightfit.fewbit.activations import ACTIVATIONS, spec_for_name
from tightfit.fewbit.fit import fit
from tightfit.fewbit.tables import Table, exact_table, load_shipped

__all__ = ["get_table"]


@functools.lru_cache(maxsize=256)
def _fitted(name: str, bits: int, params_key: tuple[tuple[str, Any], ...]) -> Table:
    """The N(0,1) fit of registry function ``name`` at non-default parameters (cached: see the module)."""
    params = dict(params_key)
    return dataclasses.replace(fit(name, bits, "normal", params=params), params=params)


def get_table(name: str, bits: int, *, weight: Any = "normal", **params: Any) -> Table:
    """The derivative table of registry function ``name`` (or an ACT2FN name) for ``bits`` bits.

    Piecewise-linear functions: the exact table for these params (its ``bits`` may be below the request).
    Smooth functions under the N(0,1) weight: the shipped table for default params, else a fit cached
    per (name, bits, params). Other weights (e.g. ``Calibration.weight(path)``): a fresh fit, not cached.
    """
    bits = check_bits(bits)
    spec = spec_for_name(name)
    p = spec.params(**params)
    if spec.kind != "smooth":
        return exact_table(spec.name, **p)
    src = ACTIVATIONS[spec.table_name]
    if isinstance(weight, str) and weight == "normal":
        if p == dict(src.defaults):
            shipped = load_shipped().get((src.name, bits))
            if shipped is not None:
                return shipped
        return _fitted(src.name, bits, tuple(sorted(p.items())))
    return dataclasses.replace(fit(src.name, bits, weight, params=p), params=p)
