"""The one rule for a few-bit code width: an integer in 1..8 (a Python int or a numpy integer, not a bool).

Every entry point that takes ``bits`` (the codec, the table fit and lookup, the ``FewBit`` config) checks
it here, so they accept the same values and raise the same error. The width is at most 8 because a code
must fit in one uint8 before packing (`tightfit.fewbit.codec`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MIN_BITS", "MAX_BITS", "VALID_BITS", "check_bits"]

MIN_BITS = 1
MAX_BITS = 8
VALID_BITS = tuple(range(MIN_BITS, MAX_BITS + 1))


def check_bits(bits: Any, what: str = "bits") -> int:
    """``bits`` as a Python int, or a ValueError naming ``what`` and the valid range.

    Bools are refused although they are ints: ``bits=True`` is almost certainly a mistake, not 1 bit.
    """
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)):
        valid = False
    else:
        valid = MIN_BITS <= int(bits) <= MAX_BITS
    if not valid:
        raise ValueError(
            f"{what} must be an integer in {MIN_BITS}..{MAX_BITS} (an int or a numpy integer, not a bool), "
            f"got {bits!r}"
        )
    return int(bits)
