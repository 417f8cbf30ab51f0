"""The derivative-table fit: exact DP (vs loops and brute force), independent error, symmetry, jumps."""

from __future__ import annotations

import importlib
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, stats

import tightfit
from tightfit.fewbit.activations import ACTIVATIONS
from tightfit.fewbit.fit import HistogramWeight, NormalWeight, fit, table_error

fitmod = importlib.import_module("tightfit.fewbit.fit")  # the module (the package attribute may be either)

# fewbit's shipped GELU tables (v0.1.0 builtin.npz): their error under N(0,1), from
# shared/research/fewbit.md §2 (computed there; those borders/levels are not in the report).
FEWBIT_GELU_ERROR = {1: 4.7e-2, 2: 9.0e-3, 3: 3.4e-3, 4: 9.8e-4}
# fewbit's own 3-bit GELU table, as printed in its fewbit/approx_test.py and used by its experiments
# (skolai/fewbit: notebooks/few-bit-backward/memory-usage-operation-only.py, benchmark/bench-roberta.py).
FEWBIT_GELU3_BORDERS = [-2.39798704e00, -7.11248159e-01, -3.26290283e-01, -1.55338428e-04, 3.26182064e-01,
                        7.10855860e-01, 2.39811567e00]
FEWBIT_GELU3_LEVELS = [-0.00260009, -0.08883533, 0.1251944, 0.37204148, 0.6277958, 0.87466175, 1.08880716,
                       1.00259936]


def _quad_error(fn, borders, levels, lo=-np.inf, hi=np.inf, density=stats.norm.pdf):
    """∫(f' − q)² w by scipy.integrate.quad, piece by piece (independent of tightfit's quadrature)."""
    x = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def d(v):
        x.data.fill_(v)
        (g,) = torch.autograd.grad(fn(x), x)
        return g.item()

    edges = [lo, *borders, hi]
    total = 0.0
    for a, b, level in zip(edges[:-1], edges[1:], levels):
        val, _ = integrate.quad(lambda v, lv=level: (d(v) - lv) ** 2 * density(v), a, b, limit=200,
                                epsabs=1e-14, epsrel=1e-10)
        total += val
    return total


def test_dp_matches_plain_loops_on_random_costs():
    rng = np.random.default_rng(1)
    for n, K in [(9, 2), (12, 4), (17, 5), (20, 8)]:
        m0 = rng.uniform(0.1, 1.0, n)
        vals = rng.normal(size=n)  # a non-monotone "derivative": no quadrangle inequality
        m1, m2 = m0 * vals, m0 * vals**2 + rng.uniform(0, 0.1, n)
        P = [np.concatenate([[0.0], np.cumsum(m)]) for m in (m0, m1, m2)]
        C = fitmod._segment_costs(*P)
        ref_cost, ref_cuts = fitmod._dp_reference(C, K)
        for upper in (None, ref_cost * 1.5, ref_cost):
            cost, cuts = fitmod._dp(C, K, upper)
            assert math.isclose(cost, ref_cost, rel_tol=1e-12)
            assert len(cuts) == K - 1 and len(set(cuts)) == K - 1
        # and the loops agree with brute force over all partitions
        prob = fitmod._Problem(np.arange(n + 1.0), *P)
        brute = min(prob.partition_cost(c) for c in itertools.combinations(range(1, n), K - 1))
        assert math.isclose(brute, ref_cost, rel_tol=1e-12)


@pytest.mark.parametrize(
    "name, bits, lo, hi",
    [("gelu", 2, -3.0, 3.0), ("tanh", 2, -2.5, 2.0), ("elu", 3, -2.0, 2.0), ("silu", 1, -3.0, 3.0)],
)
def test_fit_equals_brute_force_over_border_subsets(name, bits, lo, hi):
    """On a coarse explicit grid, the DP's table is the best of all C(n, K-1) border subsets, each
    scored by the independent error integration (table_error)."""
    cand = np.linspace(lo, hi, 11)
    K = 1 << bits
    t = fit(name, bits, grid=cand, symmetric=False)
    fn = ACTIVATIONS[name]
    best = math.inf
    for sub in itertools.combinations(cand, K - 1):
        b = np.array(sub)
        err, _ = fitmod._table_moments(fitmod.derivative_of(fn), NormalWeight(), b, None, np.empty(0), 1024)
        best = min(best, err)  # error with the best levels for these borders
    assert t.error == pytest.approx(best, rel=1e-6)
    assert set(t.borders.tolist()) <= set(cand.tolist())


@pytest.mark.parametrize("name, bits", [("gelu", 2), ("tanh", 3), ("elu", 2), ("hardswish", 2)])
def test_error_equals_scipy_quad(name, bits):
    t = fit(name, bits)
    q = _quad_error(ACTIVATIONS[name], t.borders.tolist(), t.levels.tolist())
    assert t.error == pytest.approx(q, rel=1e-6)


def test_levels_are_weighted_means():
    t = fit("gelu", 2)
    base = table_error(F.gelu, t.borders, t.levels)
    assert base == pytest.approx(t.error, rel=1e-9)
    for i in range(4):
        for eps in (-1e-3, 1e-3):
            lv = t.levels.clone()
            lv[i] += eps
            assert table_error(F.gelu, t.borders, lv) > base


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gelu_never_worse_than_fewbit(bits):
    """Against fewbit's error numbers at 1-4 bits (research report), and at 3 bits against fewbit's
    actual table, both scored here by scipy quad under the same N(0,1) weight."""
    t = fit(F.gelu, bits, weight="normal")
    assert t.error <= FEWBIT_GELU_ERROR[bits]
    assert len(t.levels) == len(t.borders) + 1 == 2**bits
    if bits == 3:
        theirs = _quad_error(F.gelu, FEWBIT_GELU3_BORDERS, FEWBIT_GELU3_LEVELS)
        assert theirs == pytest.approx(FEWBIT_GELU_ERROR[3], rel=0.02)  # it is the table the report scored
        assert _quad_error(F.gelu, t.borders.tolist(), t.levels.tolist()) < 0.6 * theirs


def test_error_decreases_with_bits():
    errs = [fit("silu", b).error for b in range(1, 6)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_symmetric_where_it_should_be(name):
    for bits in (1, 2, 3):
        t = fit(name, bits)
        b, lv = t.borders, t.levels
        assert torch.equal(b, -b.flip(0))
        s = lv + lv.flip(0)
        assert torch.allclose(s, s[0].expand_as(s), rtol=0, atol=1e-12)
        unconstrained = fit(name, bits, symmetric=False)
        assert t.error <= unconstrained.error * (1 + 1e-6)


def test_even_derivative_keeps_the_better_asymmetric_table():
    """tanh' is even: a mirrored 1-bit table has its border at 0 (two equal levels) and loses."""
    auto, forced, free = fit("tanh", 1), fit("tanh", 1, symmetric=True), fit("tanh", 1, symmetric=False)
    assert forced.borders.tolist() == [0.0]
    assert auto.error < forced.error * 0.9
    assert auto.error == pytest.approx(free.error, rel=1e-12)
    for bits in (2, 3):
        assert fit("tanh", bits).error <= fit("tanh", bits, symmetric=True).error * (1 + 1e-9)


def test_symmetric_true_rejects_asymmetric_problems():
    with pytest.raises(ValueError, match="symmetric=True"):
        fit("elu", 2, symmetric=True)
    with pytest.raises(ValueError, match="symmetric=True"):
        fit("gelu", 2, weight=NormalWeight(mean=0.5), symmetric=True)


def test_borders_land_on_jumps():
    # SELU and ELU(alpha=2): f' jumps at 0 (from the registry's breaks)
    for name, params in [("selu", {}), ("elu", {"alpha": 2.0})]:
        for bits in (2, 3):  # (at 1 bit the best single border is elsewhere: -0.77 for SELU)
            t = fit(name, bits, params=params)
            assert 0.0 in t.borders.tolist(), (name, bits, t.borders)
    # a plain callable: hardswish's jumps at ±3 are detected and located to the bit
    t = fit(lambda x: F.hardswish(x), 4, weight="uniform", lo=-4.0, hi=4.0)
    assert -3.0 in t.borders.tolist() and 3.0 in t.borders.tolist()


def test_weights():
    normal = fit("gelu", 2)
    pdf = fit("gelu", 2, weight=lambda x: torch.exp(-0.5 * x * x))  # unnormalised density, [-8, 8]
    assert pdf.error == pytest.approx(normal.error, rel=1e-6)
    samples = torch.randn(400_000, dtype=torch.float64)
    hist = fit("gelu", 2, weight=samples)
    assert hist.error == pytest.approx(normal.error, rel=0.05)
    assert torch.allclose(hist.borders, normal.borders, atol=0.05)
    uni = fit("gelu", 2, weight="uniform", lo=-4, hi=4)
    assert uni.weight.startswith("uniform")
    # a histogram weight: error by quad over its bins equals the reported one
    w = HistogramWeight([-3.0, -1.0, 0.0, 0.5, 2.0, 3.0], [1, 4, 5, 3, 1])
    t = fit("tanh", 2, weight=w)
    dens = lambda v: float(w.density(np.array([v]))[0])  # noqa: E731
    q = _quad_error(torch.tanh, t.borders.tolist(), t.levels.tolist(), -3.0, 3.0, dens)
    assert t.error == pytest.approx(q, rel=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        fit("gelu", 0)
    with pytest.raises(ValueError, match="bits"):
        fit("gelu", 9)
    with pytest.raises(ValueError, match="bits"):
        fit("gelu", True)
    with pytest.raises(ValueError, match="grid"):
        fit("gelu", 4, grid=8)
    with pytest.raises(ValueError, match="too fine"):
        fit("gelu", 2, grid=100_000)
    with pytest.raises(ValueError, match="weight"):
        fit("gelu", 2, weight="laplace")
    with pytest.raises(TypeError, match="fn"):
        fit(3.0, 2)
    with pytest.raises(ValueError, match="unknown activation"):
        fit("nope", 2)
    with pytest.raises(ValueError, match="pointwise"):
        fit(lambda x: x.sum(), 2)
    with pytest.raises(ValueError, match="no parameter"):
        fit("gelu", 2, params={"alpha": 1.0})


def _monotone_dc(C, K):
    """The divide-and-conquer DP, which assumes argmin_i D[i] + cost(i, j) is non-decreasing in j
    (true when cost has the quadrangle inequality, as 1-D k-means on sorted values does)."""
    n = C.shape[0] - 1
    D = C[:, 0].copy()
    for _ in range(2, K + 1):
        new = np.full(n + 1, np.inf)

        def rec(lo, hi, olo, ohi, D=D, new=new):
            if lo > hi:
                return
            mid = (lo + hi) // 2
            cand = D[olo : min(mid, ohi + 1)] + C[mid, olo : min(mid, ohi + 1)]
            best = olo + int(np.argmin(cand))
            new[mid] = cand.min()
            rec(lo, mid - 1, olo, best)
            rec(mid + 1, hi, best, ohi)

        rec(1, n, 0, n)
        D = new
    return float(D[n])


def test_monotone_speedup_would_be_wrong_here():
    """Why fit() uses the exact DP: a derivative is not sorted along x, the segment cost violates the
    quadrangle inequality, and the monotone divide-and-conquer DP returns a worse table (tanh, 3 bits,
    a 201-point grid), while the exact DP matches brute-force-checked loops (test above)."""
    dfn = fitmod.derivative_of(torch.tanh)
    prob = fitmod._problem(dfn, NormalWeight(), np.linspace(-6, 6, 201), np.empty(0))
    C = prob.costs()
    exact, cuts = fitmod._dp(C, 8)
    assert prob.partition_cost(cuts) == pytest.approx(exact, rel=1e-12)
    assert _monotone_dc(C, 8) > exact * (1 + 1e-3)


def test_public_name_is_the_function_whatever_was_imported_first():
    """``tightfit.fewbit.fit`` names both a submodule and its function; the package binds the function
    (imported eagerly), and importing the submodule again must not rebind it."""
    import importlib

    importlib.import_module("tightfit.fewbit.fit")
    assert tightfit.fewbit.fit is fit
    t = fitmod.fit(F.gelu, 1, weight="normal")
    u = tightfit.fewbit.fit(F.gelu, 1, weight="normal")
    assert torch.equal(t.borders, u.borders) and len(u.levels) == len(u.borders) + 1 and u.error > 0
