"""Tables: exact piecewise-linear tables (torch's kinks), tie rule, get_table, the shipped data file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tightfit.fewbit.activations import ACTIVATIONS
from tightfit.fewbit.fit import table_error
from tightfit.fewbit.lookup import get_table
from tightfit.fewbit.tables import SHIPPED_BITS, Table, exact_table, load_shipped

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "src" / "tightfit" / "fewbit" / "data" / "tables.json"
FEWBIT_GELU_ERROR = {1: 4.7e-2, 2: 9.0e-3, 3: 3.4e-3, 4: 9.8e-4}  # research/fewbit.md §2, N(0,1) weight


def _generator():
    path = ROOT / "scripts" / "make_fewbit_tables.py"
    spec = importlib.util.spec_from_file_location("make_fewbit_tables", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EXACT_CASES = [
    ("relu", {}),
    ("leaky_relu", {}),
    ("leaky_relu", {"negative_slope": 0.2}),
    ("threshold", {}),
    ("threshold", {"threshold": 0.1, "value": 5.0}),
    ("relu6", {}),
    ("hardtanh", {}),
    ("hardtanh", {"min_val": -0.3, "max_val": 0.7}),
    ("hardsigmoid", {}),
    ("hardshrink", {}),
    ("hardshrink", {"lambd": 0.3}),
    ("softshrink", {"lambd": 0.7}),
    ("softshrink", {}),
]


@pytest.mark.parametrize("name, params", EXACT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_exact_tables_match_torch_backward_including_kinks(name, params, dtype):
    spec = ACTIVATIONS[name]
    t = get_table(name, 3, **params)
    assert t.exact and t.error == 0.0
    assert t.bits == (1 if spec.kind == "step" else 2)
    assert len(t.levels) == len(t.borders) + 1
    kinks = torch.cat([t.borders.to(dtype), t.borders.float().to(dtype)])  # both roundings of the kinks
    # NaN first: in the vectorised body of torch's kernel (its scalar tail differs at NaN for bands)
    x = torch.cat(
        [
            torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype),
            torch.randn(300, dtype=torch.float64).to(dtype) * 4,
            kinks,
            torch.nextafter(kinks, kinks + 1),
            torch.nextafter(kinks, kinks - 1),
        ]
    )
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(spec(xx, **params).sum(), xx)
    assert torch.equal(t(x), g), (name, params, x[t(x) != g], t(x)[t(x) != g], g[t(x) != g])


def test_tie_rule():
    t = exact_table("hardtanh")
    assert t.right == (False, True) and t.bucketize_right is None
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    assert t.encode(x).tolist() == [0, 0, 1, 2, 2]
    r = exact_table("relu")
    assert r.bucketize_right is False
    assert torch.equal(r.encode(x), torch.bucketize(x, r.borders.float(), right=False))
    # mixed flags equal the sum-of-comparisons rule
    t = Table(
        borders=[-1.0, 0.0, 0.0, 2.0],
        levels=[0, 1, 2, 3, 4],
        error=0.1,
        bits=3,
        right=(True, False, True, False),
    )
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    ref = (x >= -1).long() + (x > 0).long() + (x >= 0).long() + (x > 2).long()
    assert torch.equal(t.encode(x), ref)


def test_table_validation_and_round_trip():
    with pytest.raises(ValueError, match="len\\(levels\\)"):
        Table(borders=[0.0], levels=[1.0], error=0.0, bits=1)
    with pytest.raises(ValueError, match="sorted"):
        Table(borders=[1.0, 0.0], levels=[1.0, 2.0, 3.0], error=0.0, bits=2)
    with pytest.raises(ValueError, match="bits"):
        Table(borders=[0.0, 1.0], levels=[1.0, 2.0, 3.0], error=0.0, bits=1)
    with pytest.raises(ValueError, match="finite"):
        Table(borders=[float("nan")], levels=[1.0, 2.0], error=0.0, bits=1)
    t = get_table("gelu", 3)
    u = Table.from_dict(json.loads(json.dumps(t.to_dict())))
    assert torch.equal(u.borders, t.borders) and torch.equal(u.levels, t.levels)
    assert (u.error, u.bits, u.right, u.name) == (t.error, t.bits, t.right, t.name)


def test_get_table_sources_and_errors():
    shipped = load_shipped()
    assert get_table("gelu", 2) is shipped[("gelu", 2)]
    assert get_table("gelu_new", 2) is shipped[("gelu_tanh", 2)]  # same function, shared table
    assert get_table("swish", 4) is shipped[("silu", 4)]
    a = get_table("elu", 2, alpha=2.0)  # non-default params: fitted, then cached
    assert get_table("elu", 2, alpha=2.0) is a and a.params == {"alpha": 2.0}
    assert a.error < get_table("elu", 1, alpha=2.0).error
    w = get_table("gelu", 2, weight="uniform")
    assert w.weight.startswith("uniform") and not torch.equal(w.borders, shipped[("gelu", 2)].borders)
    for bad in (0, 9, 2.5, True):
        with pytest.raises(ValueError, match="bits"):
            get_table("gelu", bad)
    with pytest.raises(ValueError, match="no parameter"):
        get_table("gelu", 2, alpha=1.0)
    with pytest.raises(ValueError, match="unknown activation"):
        get_table("nope", 2)


def test_shipped_file_complete_and_consistent():
    assert DATA.stat().st_size < 2 * 1024 * 1024
    shipped = load_shipped()
    for name, spec in ACTIVATIONS.items():
        if spec.table_of is not None or spec.kind != "smooth":
            continue
        errs = []
        for bits in SHIPPED_BITS:
            t = shipped[(name, bits)]
            assert len(t.levels) == 2**bits == len(t.borders) + 1
            assert t.params == dict(spec.defaults) and t.bucketize_right is not None
            errs.append(t.error)
        assert all(a > b > 0 for a, b in zip(errs, errs[1:])), name  # error decreases with bits
    for bits, ref in FEWBIT_GELU_ERROR.items():
        assert shipped[("gelu", bits)].error <= ref  # never worse than fewbit's tables, same weight
    for name in ("relu", "hardtanh"):  # exact ones are shipped too, as built
        assert shipped[(name, exact_table(name).bits)].to_dict() == exact_table(name).to_dict()


@pytest.mark.parametrize("name, bits", [("gelu", 2), ("tanh", 3), ("hardswish", 1), ("quick_gelu", 4)])
def test_shipped_entries_regenerate(name, bits):
    """A few entries of the shipped file, regenerated by the generator's own function, are identical
    (up to float rounding between machines) and their stored error is re-checked independently."""
    new = _generator().make_table(name, bits).to_dict()
    old = load_shipped()[(name, bits)].to_dict()
    assert {k: v for k, v in new.items() if k not in ("borders", "levels", "error")} == {
        k: v for k, v in old.items() if k not in ("borders", "levels", "error")
    }
    for k in ("borders", "levels"):
        assert torch.allclose(torch.tensor(new[k]), torch.tensor(old[k]), rtol=1e-9, atol=1e-12)
    assert new["error"] == pytest.approx(old["error"], rel=1e-9)
    t = load_shipped()[(name, bits)]
    spec = ACTIVATIONS[name]
    again = table_error(spec, t.borders, t.levels, breaks=spec.break_points())
    assert again == pytest.approx(t.error, rel=1e-9)
