"""Variants and combined options: keys, techniques, per-block conversion and its undo, gradient SQNR."""

from __future__ import annotations

import math

import pytest
import torch

from tightfit.planner.result import techniques_of
from tightfit.planner.variants import Combined, Variant, converted, grad_sqnr
from tightfit.remat.options import RECOMPUTE, SAVE_MATMUL, STORE
from tightfit.testing import build


@pytest.mark.parametrize(
    "variant", [Variant(fewbit=2), Variant(sketch=0.5), Variant(fewbit=3, sketch=0.25), Variant(offload=True)]
)
def test_keys_round_trip_and_name_their_techniques(variant: Variant) -> None:
    assert Variant.parse(variant.key) == variant
    option = Combined(SAVE_MATMUL if variant.offload else STORE, variant)
    assert set(techniques_of(option)) == set(variant.techniques) | (
        {"recompute"} if variant.offload else set()
    )
    assert (
        option.description
        and option.label == option.key
        and hash(option) == hash(Combined(option.base, variant))
    )
    assert variant.lossy == (not variant.offload)


def test_nothing_to_convert_and_malformed_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="converts something"):
        Variant()
    with pytest.raises(ValueError, match="malformed variant"):
        Variant.parse("quant4")
    assert techniques_of(RECOMPUTE) == ("recompute",) and techniques_of(STORE) == ()


def test_one_block_converted_and_put_back() -> None:
    model, _ = build("gpt2-tiny")
    before = [type(m) for m in model.modules()]
    with converted(model, {Variant(fewbit=2, sketch=0.5): ["transformer.h.1"]}) as n:
        paths = [p for p, m in model.named_modules() if type(m).__module__.startswith("tightfit")]
        assert n == 5 and paths and all(p.startswith("transformer.h.1.") for p in paths)
    assert [type(m) for m in model.modules()] == before


def test_grad_sqnr() -> None:
    a = [torch.tensor([3.0, 4.0]), None]
    assert math.isinf(grad_sqnr(a, [torch.tensor([3.0, 4.0]), None]))
    assert grad_sqnr(a, [torch.tensor([3.0, 3.0]), None]) == pytest.approx(10 * math.log10(25.0))
    assert grad_sqnr(a, [None, None]) == -math.inf
