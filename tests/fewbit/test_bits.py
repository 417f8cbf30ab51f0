"""One bit-width rule for every entry point: the codec, the fit, the table lookup and the FewBit config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tightfit.fewbit import codec
from tightfit.fewbit._bits import VALID_BITS, check_bits
from tightfit.fewbit.config import FewBit
from tightfit.fewbit.fit import fit
from tightfit.fewbit.lookup import get_table
from tightfit.fewbit.tables import SHIPPED_BITS

ENTRY_POINTS = {
    "packed_nbytes": lambda b: codec.packed_nbytes(10, b),
    "pack": lambda b: codec.pack(torch.zeros(10, dtype=torch.uint8), b),
    "decode_mul": lambda b: codec.decode_mul(
        codec.pack(torch.zeros(4, dtype=torch.uint8), 2), torch.ones(4), torch.ones(4), b
    ),
    "fit": lambda b: fit("gelu", b, grid=256),
    "get_table": lambda b: get_table("gelu", b),
    "FewBit": lambda b: FewBit(bits=b),
}


@pytest.mark.parametrize("bad", [0, 9, -1, 2.0, "2", True, np.bool_(True), None])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_invalid_bits_refused_everywhere_with_one_message(entry: str, bad: object) -> None:
    with pytest.raises(ValueError, match=r"bits must be an integer in 1\.\.8 \(an int or a numpy integer"):
        ENTRY_POINTS[entry](bad)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_numpy_integers_accepted_everywhere(entry: str) -> None:
    ENTRY_POINTS[entry](np.int64(2))
    assert FewBit(bits=np.int32(3)).bits == 3 and type(FewBit(bits=np.int32(3)).bits) is int
    assert FewBit(bits=np.int64(2)).to_json() == FewBit(bits=2).to_json()


def test_check_bits_names_the_argument() -> None:
    assert [check_bits(b) for b in VALID_BITS] == list(range(1, 9)) and SHIPPED_BITS == VALID_BITS
    with pytest.raises(ValueError, match=r"^FewBit\.bits must be .* got 0$"):
        FewBit(bits=0)
