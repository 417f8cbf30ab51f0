"""Optimal piecewise-constant approximation of an activation's derivative, by exact dynamic programming.

Problem: given f, a number of bits b and an input density w, find borders t_1 < ... < t_{K-1} (K = 2^b)
and levels l_0..l_{K-1} minimising

    E = ∫ (f'(x) − q(x))² w(x) dx / ∫ w(x) dx,   q(x) = l_k for x in piece k,

i.e. the expected squared error of the backward multiplier for an input x ~ w. For fixed borders the best
level of a piece is the w-weighted mean of f' on it, and the piece's cost is ∫f'²w − (∫f'w)²/∫w, so
with prefix sums of ∫w, ∫f'w, ∫f'²w over grid cells every piece's cost is O(1). The optimal K-piece
partition of the grid is then an exact DP: D_k[j] = min_{i<j} D_{k-1}[i] + cost(i, j).

NOTE (exactness): the DP is exact over its candidate grid; no monotonicity (quadrangle inequality) is
assumed, because it does not hold for non-monotone derivatives (GELU', tanh'...): the monotone
divide-and-conquer DP returns a 0.4% worse 3-bit tanh table on a 201-point grid (see
tests/fewbit/test_fit.py). The grid, not the search, is the only approximation; it is made fine where
borders go.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._bits import check_bits
from .activations import ActivationSpec, spec_for_name
from .tables import Table, tie_flags

__all__ = [
    "DensityWeight",
    "HistogramWeight",
    "NormalWeight",
    "UniformWeight",
    "Weight",
    "derivative_of",
    "fit",
    "resolve_weight",
    "table_error",
]

_GL_NODES = 8  # Gauss-Legendre nodes per integration sub-interval (exact for polynomials of degree 15)
_PRE_GRID = 8193  # uniform pre-grid used to shape the candidate grid and to detect symmetry / jumps
_SYM_TOL = 1e-9
_MAX_GRID = 8192


# --------------------------------------------------------------------------------------------------------
# Weights (input densities). Densities need not be normalised: errors are divided by the total mass.


class Weight:
    """An input density on [lo, hi]; ``edges`` are its discontinuities (integration splits there)."""

    lo: float
    hi: float
    edges: np.ndarray = np.empty(0)

    def density(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def core(self) -> tuple[float, float]:
        """A range holding all but a negligible part of the mass (the grid gets extra resolution there)."""
        return self.lo, self.hi

    def describe(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class NormalWeight(Weight):
    """N(mean, std²) truncated to mean ± span·std (the mass outside ±8σ is 1e-15: negligible)."""

    mean: float = 0.0
    std: float = 1.0
    span: float = 8.0

    def __post_init__(self) -> None:
        if not (self.std > 0 and math.isfinite(self.std) and math.isfinite(self.mean)):
            raise ValueError(f"NormalWeight needs a finite mean and std > 0, got {self.mean}, {self.std}")

    @property
    def lo(self) -> float:  # type: ignore[override]
        return self.mean - self.span * self.std

    @property
    def hi(self) -> float:  # type: ignore[override]
        return self.mean + self.span * self.std

    def density(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.std
        return np.exp(-0.5 * z * z) / (self.std * math.sqrt(2 * math.pi))

    def describe(self) -> str:
        return f"normal(mean={self.mean:g}, std={self.std:g})"


@dataclass(frozen=True)
class UniformWeight(Weight):
    """Uniform density on [lo, hi] (fewbit's choice, on [-100, 100])."""

    lo: float = -8.0
    hi: float = 8.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise ValueError(f"UniformWeight needs finite lo < hi, got [{self.lo}, {self.hi}]")

    def density(self, x: np.ndarray) -> np.ndarray:
        return np.ones_like(x)

    def describe(self) -> str:
        return f"uniform[{self.lo:g}, {self.hi:g}]"


class DensityWeight(Weight):
    """A user density ``fn(x)`` (x a float64 tensor; returns a tensor or array, >= 0) on [lo, hi]."""

    def __init__(self, fn: Callable[[Any], Any], lo: float = -8.0, hi: float = 8.0):
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"a density weight needs finite lo < hi, got [{lo}, {hi}]")
        self.fn, self.lo, self.hi = fn, float(lo), float(hi)

    def density(self, x: np.ndarray) -> np.ndarray:
        out = self.fn(torch.from_numpy(np.ascontiguousarray(x)))
        out = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, dtype=float)
        out = np.broadcast_to(np.asarray(out, dtype=np.float64), x.shape)
        if not np.all(np.isfinite(out)) or np.any(out < 0):
            raise ValueError("the weight density must return finite values >= 0")
        return out

    def describe(self) -> str:
        return f"density {getattr(self.fn, '__name__', 'fn')} on [{self.lo:g}, {self.hi:g}]"


class HistogramWeight(Weight):
    """A piecewise-constant density from a histogram (``counts[i]`` samples in [edges[i], edges[i+1]))."""

    def __init__(self, edges: Any, counts: Any):
        e = np.asarray(edges, dtype=np.float64).ravel()
        c = np.asarray(counts, dtype=np.float64).ravel()
        if e.size != c.size + 1 or c.size == 0:
            raise ValueError(f"a histogram needs len(edges) == len(counts) + 1 >= 2, got {e.size}, {c.size}")
        if not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
            raise ValueError("histogram edges must be finite and strictly increasing")
        if np.any(c < 0) or not np.all(np.isfinite(c)) or c.sum() <= 0:
            raise ValueError("histogram counts must be finite, >= 0, and not all zero")
        nz = np.flatnonzero(c)
        first, last = nz[0], nz[-1]
        self.edges_all = e[first : last + 2]
        self.counts = c[first : last + 1]
        self.lo, self.hi = float(self.edges_all[0]), float(self.edges_all[-1])
        self.edges = self.edges_all[1:-1]
        self._dens = self.counts / np.diff(self.edges_all) / self.counts.sum()

    @classmethod
    def from_samples(cls, samples: Any, bins: int = 2048) -> HistogramWeight:
        """Histogram of samples on their [min, max] range (non-finite samples are dropped)."""
        s = torch.as_tensor(samples).detach().double().flatten().cpu().numpy()
        s = s[np.isfinite(s)]
        if s.size == 0:
            raise ValueError("no finite samples to build a weight from")
        lo, hi = float(s.min()), float(s.max())
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        counts, edges = np.histogram(s, bins=bins, range=(lo, hi))
        return cls(edges, counts)

    def density(self, x: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.edges_all, x, side="right") - 1
        inside = (idx >= 0) & (idx < self.counts.size)
        out = np.zeros_like(x, dtype=np.float64)
        out[inside] = self._dens[idx[inside]]
        out[x == self.hi] = self._dens[-1]
        return out

    @property
    def core(self) -> tuple[float, float]:
        """From the bin holding the 1e-4 quantile to the one holding the 1 - 1e-4 quantile."""
        cum = np.cumsum(self.counts) / self.counts.sum()
        i = int(np.searchsorted(cum, 1e-4, side="left"))
        j = int(np.searchsorted(cum, 1.0 - 1e-4, side="left"))
        return float(self.edges_all[i]), float(self.edges_all[min(j + 1, self.counts.size)])

    def describe(self) -> str:
        return f"histogram({self.counts.size} bins on [{self.lo:g}, {self.hi:g}])"


def resolve_weight(weight: Any, lo: float | None = None, hi: float | None = None) -> Weight:
    """Turn ``fit``'s weight argument into a :class:`Weight`.

    Accepted: "normal" (N(0,1)), "uniform" (on [lo, hi], default [-8, 8]), a :class:`Weight` (e.g. from
    :meth:`Calibration.weight`), a 1-D tensor/array of samples (histogram), or a callable density.
    """
    if isinstance(weight, Weight):
        w = weight
    elif isinstance(weight, str):
        if weight == "normal":
            w = NormalWeight()
        elif weight == "uniform":
            w = UniformWeight(-8.0 if lo is None else lo, 8.0 if hi is None else hi)
        else:
            raise ValueError(
                f"weight must be 'normal', 'uniform', samples, a Weight or a callable; got {weight!r}"
            )
    elif isinstance(weight, (torch.Tensor, np.ndarray, list, tuple)):
        w = HistogramWeight.from_samples(weight)
    elif callable(weight):
        w = DensityWeight(weight, -8.0 if lo is None else lo, 8.0 if hi is None else hi)
    else:
        raise TypeError(
            "weight must be 'normal', 'uniform', samples, a Weight or a callable; "
            f"got {type(weight).__name__}"
        )
    if isinstance(w, (UniformWeight, DensityWeight)):
        return w
    if lo is not None or hi is not None:  # restrict the range of a given weight
        a = w.lo if lo is None else float(lo)
        b = w.hi if hi is None else float(hi)
        if not a < b:
            raise ValueError(f"lo must be < hi, got [{a}, {b}]")
        return _Restricted(w, a, b)
    return w


class _Restricted(Weight):
    def __init__(self, base: Weight, lo: float, hi: float):
        self.base, self.lo, self.hi = base, lo, hi
        self.edges = base.edges[(base.edges > lo) & (base.edges < hi)]

    def density(self, x: np.ndarray) -> np.ndarray:
        return self.base.density(x)

    @property
    def core(self) -> tuple[float, float]:
        a, b = self.base.core
        a, b = max(a, self.lo), min(b, self.hi)
        return (a, b) if a < b else (self.lo, self.hi)

    def describe(self) -> str:
        return f"{self.base.describe()} on [{self.lo:g}, {self.hi:g}]"


# --------------------------------------------------------------------------------------------------------
# Derivatives and integration.


def derivative_of(fn: Callable[..., torch.Tensor]) -> Callable[[np.ndarray], np.ndarray]:
    """x (float64 array) -> f'(x) by autograd in float64, with torch's conventions at kinks."""

    def d(x: np.ndarray) -> np.ndarray:
        t = torch.tensor(np.asarray(x, dtype=np.float64), dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            y = fn(t)
            if not isinstance(y, torch.Tensor) or y.shape != t.shape:
                raise ValueError("fn must be pointwise: a tensor in, a tensor of the same shape out")
            (g,) = torch.autograd.grad(y.sum(), t)
        return g.detach().numpy()

    return d


_GL_X, _GL_W = np.polynomial.legendre.leggauss(_GL_NODES)


def _nodes(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on each interval [points[i], points[i+1]]: arrays (m, G)."""
    a, b = points[:-1, None], points[1:, None]
    half = 0.5 * (b - a)
    return a + half * (_GL_X[None, :] + 1.0), half * _GL_W[None, :]


def _breakpoints(lo: float, hi: float, *parts: np.ndarray) -> np.ndarray:
    pts = np.concatenate([[lo, hi], *[np.asarray(p, dtype=np.float64).ravel() for p in parts]])
    pts = np.unique(pts[(pts >= lo) & (pts <= hi)])
    return pts


def _cell_moments(
    dfn: Callable[[np.ndarray], np.ndarray], w: Weight, cells: np.ndarray, breaks: np.ndarray, shift: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """∫w, ∫(f'−shift)w, ∫(f'−shift)²w over each cell [cells[i], cells[i+1]] (split at w's edges)."""
    pts = _breakpoints(cells[0], cells[-1], cells, w.edges, breaks)
    x, gw = _nodes(pts)
    d = dfn(x.ravel()).reshape(x.shape) - shift
    ww = w.density(x.ravel()).reshape(x.shape) * gw
    m0, m1, m2 = ww.sum(1), (ww * d).sum(1), (ww * d * d).sum(1)
    owner = np.searchsorted(cells, 0.5 * (pts[:-1] + pts[1:]), side="right") - 1
    n = cells.size - 1
    return (np.bincount(owner, m0, n), np.bincount(owner, m1, n), np.bincount(owner, m2, n))


def table_error(
    fn: Callable[..., torch.Tensor],
    borders: Any,
    levels: Any,
    weight: Any = "normal",
    *,
    breaks: Sequence[float] = (),
    subdivisions: int = 4096,
) -> float:
    """∫(f' − q)² w / ∫w for a given table, by Gauss-Legendre on [w.lo, w.hi] split at borders, breaks
    and w's edges, plus ``subdivisions`` uniform pieces (independent of the DP's grid)."""
    w = resolve_weight(weight)
    err, _ = _table_moments(derivative_of(fn), w, np.asarray(borders, np.float64),
                            np.asarray(levels, np.float64), np.asarray(breaks, np.float64), subdivisions)
    return err


def _table_moments(dfn, w: Weight, borders: np.ndarray, levels: np.ndarray | None, breaks: np.ndarray,
                   subdivisions: int) -> tuple[float, np.ndarray]:
    """(error, best levels) of the table with these borders; error uses ``levels`` if given."""
    pts = _breakpoints(w.lo, w.hi, np.linspace(w.lo, w.hi, subdivisions + 1), borders, breaks, w.edges)
    x, gw = _nodes(pts)
    xf = x.ravel()
    d = dfn(xf)
    ww = w.density(xf) * gw.ravel()
    mass = ww.sum()
    # Sub-intervals never straddle a border, so the midpoint decides the piece (ties: any side, measure 0).
    piece = np.searchsorted(borders, np.repeat(0.5 * (pts[:-1] + pts[1:]), _GL_NODES), side="left")
    k = borders.size + 1
    m0 = np.bincount(piece, ww, k)
    m1 = np.bincount(piece, ww * d, k)
    best = np.empty(k)
    has = m0 > 0
    best[has] = m1[has] / m0[has]
    if not has.all():  # pieces without mass: the derivative at the piece's middle (any value is optimal)
        edges = np.concatenate([[min(w.lo, borders[0] - 1.0 if borders.size else w.lo)], borders,
                                [max(w.hi, borders[-1] + 1.0 if borders.size else w.hi)]])
        mids = 0.5 * (edges[:-1] + edges[1:])
        best[~has] = dfn(mids[~has])
    lv = best if levels is None else levels
    r = d - lv[piece]
    return float((ww * r * r).sum() / mass), best


# --------------------------------------------------------------------------------------------------------
# Candidate grid, symmetry, jumps.


def _detect_jumps(dfn, pre: np.ndarray, d: np.ndarray) -> list[float]:
    """Locations where f' jumps, found on the pre-grid and refined by bisection to float64 precision."""
    step = np.abs(np.diff(d))
    scale = max(float(np.ptp(d)), 1e-300)
    nb = np.maximum(np.concatenate([[0.0], step[:-1]]), np.concatenate([step[1:], [0.0]]))
    cand = np.flatnonzero((step > 1e-6 * scale) & (step > 20.0 * nb))
    out = []
    for i in cand[:64]:
        a, b = float(pre[i]), float(pre[i + 1])
        da, db = dfn(np.array([a, b]))
        for _ in range(200):
            m = 0.5 * (a + b)
            if m <= a or m >= b:
                break
            dm = dfn(np.array([m]))[0]
            if abs(dm - da) <= abs(dm - db):
                a = m
            else:
                b = m
        fa, fb = dfn(np.array([a, b]))
        if abs(fa - fb) > 0.5 * step[i]:  # still there between adjacent floats: a jump, not a steep slope
            out.append(b if len(repr(b)) <= len(repr(a)) else a)
    return out


def _symmetry(dfn, w: Weight, pre_pos: np.ndarray) -> str | None:
    """'even' (f'(-x) = f'(x)) or 'odd' (f'(-x) = c - f'(x)) when w is symmetric too, else None."""
    if not math.isclose(w.lo, -w.hi, rel_tol=1e-12, abs_tol=1e-12):
        return None
    x = pre_pos[pre_pos > 1e-9]
    wp, wn = w.density(x), w.density(-x)
    if np.max(np.abs(wp - wn)) > _SYM_TOL * max(np.max(np.abs(wp)), 1e-300):
        return None
    dp, dn = dfn(x), dfn(-x)
    tol = _SYM_TOL * (1.0 + np.max(np.abs(dp)))
    if np.max(np.abs(dp - dn)) <= tol:
        return "even"
    s = dp + dn
    if np.max(np.abs(s - np.median(s))) <= tol:
        return "odd"
    return None


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


def _pre_grid(w: Weight, a: float, b: float) -> np.ndarray:
    """A fine grid on [a, b], doubled on the weight's core range (where the mass is)."""
    pre = np.linspace(a, b, _PRE_GRID)
    ca, cb = max(w.core[0], a), min(w.core[1], b)
    if ca < cb and (cb - ca) < 0.5 * (b - a):
        pre = np.unique(np.concatenate([pre, np.linspace(ca, cb, _PRE_GRID)]))
    return pre


def _shaped_grid(dfn, w: Weight, a: float, b: float, n: int, breaks: np.ndarray) -> np.ndarray:
    """n cells on [a, b]: 3/4 of them placed by the asymptotically optimal border density
    (f''² w)^(1/3), 1/4 uniformly (half on [a, b], half on the weight's core range, which differ when
    the weight has far outliers); then the breaks are added as grid points."""
    pre = _pre_grid(w, a, b)
    d = dfn(pre)
    wv = w.density(pre)
    d2 = np.gradient(d, pre)
    rho = np.cbrt(d2 * d2 * wv)
    h = np.diff(pre)
    h = np.maximum(np.concatenate([h[:1], h]), np.concatenate([h, h[-1:]]))
    for t in np.concatenate([breaks, w.edges]) if w.edges.size < 64 else breaks:
        rho[np.abs(pre - t) <= 2.5 * h] = 0.0  # a jump is a break point, not a place needing density
    total = _trapezoid(rho, pre)
    ca, cb = max(w.core[0], a), min(w.core[1], b)
    uni = np.full_like(pre, 0.5 / (b - a))
    if ca < cb:
        uni += np.where((pre >= ca) & (pre <= cb), 0.5 / (cb - ca), 0.0)
    else:
        uni *= 2.0
    mix = uni
    if total > 0 and np.isfinite(total):
        mix = 0.75 * rho / total + 0.25 * uni
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (mix[1:] + mix[:-1]) * np.diff(pre))])
    cdf /= cdf[-1]
    g = np.interp(np.linspace(0.0, 1.0, n + 1), cdf, pre)
    g[0], g[-1] = a, b
    inner = breaks[(breaks > a) & (breaks < b)]
    g = np.unique(np.concatenate([g, inner]))
    keep = np.concatenate([[True], np.diff(g) > 1e-12 * max(1.0, abs(b - a))])
    # never drop a break point: drop its too-close neighbour instead
    g = g[keep | np.isin(g, inner)]
    return g


# --------------------------------------------------------------------------------------------------------
# The DP.


def _segment_costs(P0: np.ndarray, P1: np.ndarray, P2: np.ndarray) -> np.ndarray:
    """C[j, i] = cost of the segment (grid i .. grid j), +inf where j <= i. Shape (n+1, n+1)."""
    c = np.subtract.outer(P1, P1)
    c *= c
    w = np.subtract.outer(P0, P0)
    np.divide(c, w, out=c, where=w > 0)  # zero-mass segments have s = 0 exactly: c stays 0
    del w
    q = np.subtract.outer(P2, P2)
    q -= c
    del c
    np.maximum(q, 0.0, out=q)
    idx = np.arange(P0.size)
    q[idx[:, None] <= idx[None, :]] = np.inf
    return q


_ROW_BLOCK = 64


def _dp(C: np.ndarray, K: int, upper: float | None = None) -> tuple[float, list[int]]:
    """Optimal partition of grid 0..n into exactly K non-empty segments; returns (cost, inner borders).

    One vectorised min-plus step per piece: D_k[j] = min_i C[j, i] + D_{k-1}[i], by blocks of rows so
    that only i < j is scanned. ``upper``: the cost of any K-partition; a segment costing more cannot be
    part of an optimal one (all costs are >= 0), so for each j only i >= i_min(j) (the first i with
    C[j, i] <= upper) is scanned. The result is the same exact optimum, found faster.
    """
    n = C.shape[0] - 1
    if K > n:
        raise ValueError(f"{K} pieces need a grid with at least {K} cells, got {n}")
    D = C[:, 0].copy()  # one segment 0..j
    if upper is not None and math.isfinite(upper):
        ok = C <= upper * (1 + 1e-9) + 1e-300
        ok[np.arange(n + 1), np.maximum(np.arange(n + 1) - 1, 0)] = True  # a one-cell segment is always kept
        i_min = ok.argmax(axis=1)
        del ok
    else:
        i_min = np.zeros(n + 1, dtype=np.int64)
    blocks = []
    for r0 in range(1, n + 1, _ROW_BLOCK):
        r1 = min(r0 + _ROW_BLOCK, n + 1)
        blocks.append((r0, r1, int(i_min[r0:r1].min())))
    back = []
    buf = np.empty(_ROW_BLOCK * (n + 1))
    rows = np.arange(_ROW_BLOCK)
    for _ in range(2, K):
        newD = np.empty(n + 1)
        newD[0] = np.inf
        arg = np.zeros(n + 1, dtype=np.int64)
        for r0, r1, c0 in blocks:
            b = buf[: (r1 - r0) * (r1 - c0)].reshape(r1 - r0, r1 - c0)
            np.add(C[r0:r1, c0:r1], D[None, c0:r1], out=b)
            a = b.argmin(axis=1)
            arg[r0:r1] = a + c0
            newD[r0:r1] = b[rows[: r1 - r0], a]
        D = newD
        back.append(arg)
    if K >= 2:
        last = C[n] + D
        i = int(np.argmin(last))
        total = float(last[i])
        cuts = [i]
        for arg in reversed(back):
            i = int(arg[i])
            cuts.append(i)
        return total, sorted(cuts)
    return float(D[n]), []


def _dp_reference(C: np.ndarray, K: int) -> tuple[float, list[int]]:
    """Plain-loop version of :func:`_dp` (for tests)."""
    n = C.shape[0] - 1
    INF = math.inf
    D = [[INF] * (n + 1) for _ in range(K + 1)]
    A = [[-1] * (n + 1) for _ in range(K + 1)]
    D[0][0] = 0.0
    for k in range(1, K + 1):
        for j in range(1, n + 1):
            for i in range(j):
                v = D[k - 1][i] + C[j, i]
                if v < D[k][j]:
                    D[k][j], A[k][j] = v, i
    cuts, j = [], n
    for k in range(K, 1, -1):
        j = A[k][j]
        cuts.append(j)
    return D[K][n], sorted(cuts)


@dataclass
class _Problem:
    """The discretised problem: grid, cell moments and prefix sums (exposed for tests)."""

    grid: np.ndarray
    P0: np.ndarray
    P1: np.ndarray
    P2: np.ndarray

    def costs(self) -> np.ndarray:
        return _segment_costs(self.P0, self.P1, self.P2)

    def partition_cost(self, cuts: Sequence[int]) -> float:
        idx = [0, *cuts, self.grid.size - 1]
        C = 0.0
        for i, j in zip(idx[:-1], idx[1:]):
            w = self.P0[j] - self.P0[i]
            s = self.P1[j] - self.P1[i]
            C += max(self.P2[j] - self.P2[i] - (s * s / w if w > 0 else 0.0), 0.0)
        return C


def _coarse_upper_bound(prob: _Problem, C: np.ndarray, K: int) -> float:
    """The full-grid cost of the optimal partition over every 4th grid point: a valid, tight bound."""
    n = C.shape[0] - 1
    sub = np.unique(np.concatenate([np.arange(0, n + 1, 4), [n]]))
    if sub.size - 1 < K:
        return math.inf
    _, cuts = _dp(C[np.ix_(sub, sub)], K)
    return prob.partition_cost([int(sub[c]) for c in cuts])


def _problem(dfn, w: Weight, grid: np.ndarray, breaks: np.ndarray) -> _Problem:
    mid = dfn(np.linspace(w.lo, w.hi, 257))
    shift = float(np.median(mid))  # centring f' reduces cancellation in the prefix sums
    m0, m1, m2 = _cell_moments(dfn, w, grid, breaks, shift)
    mass = m0.sum()
    if not mass > 0:
        raise ValueError(f"the weight has no mass on [{w.lo}, {w.hi}]")
    z = np.zeros(1)
    return _Problem(grid, *(np.concatenate([z, np.cumsum(m / mass)]) for m in (m0, m1, m2)))


# --------------------------------------------------------------------------------------------------------
# Public entry point.


def fit(
    fn: Any,
    bits: int,
    weight: Any = "normal",
    *,
    grid: int = 2048,
    lo: float | None = None,
    hi: float | None = None,
    symmetric: bool | None = None,
    breaks: Sequence[float] = (),
    params: dict[str, Any] | None = None,
) -> Table:
    """The optimal 2^bits-piece piecewise-constant approximation q of f' under the input density ``weight``.

    Minimises E = ∫(f'(x) − q(x))² w(x) dx / ∫w by exact dynamic programming over candidate borders.

    - ``fn``: a pointwise function of a tensor, or a registry name (``"gelu"``, ``"gelu_new"``...) with
      ``params``. f' is taken by autograd in float64.
    - ``weight``: ``"normal"`` (N(0,1), on ±8σ), ``"uniform"`` (on [lo, hi], default [-8, 8]), samples
      (1-D tensor/array), a density callable, or a :class:`Weight` (e.g. ``Calibration.weight(path)``).
      ``lo``/``hi`` restrict the range considered.
    - Grid: ``grid`` cells (default 2048) on [lo, hi] (or ``grid`` = an array of candidate borders, used
      as given, without break points), 3/4 placed by the asymptotically optimal border
      density (f''² w)^(1/3) and 1/4 uniformly, plus every break point: the spec's ``breaks``, the given
      ``breaks`` and f' jumps detected on an 8193-point pre-grid and located by bisection. So borders can
      land exactly on derivative jumps. Cell integrals of w, f'w, f'²w by 8-point Gauss-Legendre (split
      at the weight's own discontinuities), prefix-summed: each segment cost is O(1).
    - DP: D_k[j] = min_{i<j} D_{k-1}[i] + cost(i, j) for k = 1..K, K = 2^bits, vectorised over (i, j):
      O(K·n²) time, O(n²) memory (n = grid; 2048 -> 32 MiB). Exact over the grid (no monotonicity is
      assumed); segments costing more than a known K-partition (the symmetric one, or the optimum on
      every 4th grid point) are skipped, which changes the running time, not the result
      (``scripts/make_fewbit_tables.py --timing`` times the fit of GELU, SiLU and Tanh at bits 1..8).
    - Symmetry: when w is symmetric and f' is even or odd about a constant (f'(-x) = c - f'(x): GELU,
      SiLU, sigmoid-like), the grid is mirrored and a half-line DP with K/2 pieces gives the best
      symmetric table (border at 0). ``symmetric=None`` returns it when it is no worse than the
      unconstrained optimum (it is, up to ties, for odd f'; an even f' such as tanh' loses a piece to
      the border at 0, so the unconstrained table wins); True forces it (error if f'/w are not
      symmetric), False skips it.
    - Result: levels are the w-weighted means of f' per piece, and ``error`` is E of the returned table,
      re-integrated independently of the DP's grid (Gauss-Legendre on 4096+ sub-intervals split at
      borders). Ties: one ``right`` flag for all borders (``torch.bucketize``'s), False unless every
      border on a jump of f' has torch's f'(border) on the upper side.
    """
    K = 1 << check_bits(bits)
    explicit = None
    if isinstance(grid, (np.ndarray, torch.Tensor, list, tuple)):
        explicit = np.unique(np.asarray(grid, dtype=np.float64).ravel())
        if not np.all(np.isfinite(explicit)):
            raise ValueError("an explicit grid must hold finite candidate borders")
    elif isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 2 * K:
        raise ValueError(
            f"grid must be an int >= 2**(bits+1) = {2 * K} or an array of candidates, got {grid!r}"
        )
    n_cells = explicit.size + 1 if explicit is not None else int(grid)
    if n_cells > _MAX_GRID:
        raise ValueError(
            f"grid of {n_cells} cells is too fine: the DP keeps (n+1)² float64 costs, so at most "
            f"{_MAX_GRID} cells ({(_MAX_GRID + 1) ** 2 * 8 / 2**30:.1f} GiB per array)"
        )
    name = None
    spec_breaks: tuple[float, ...] = ()
    if isinstance(fn, (str, ActivationSpec)):
        spec = spec_for_name(fn) if isinstance(fn, str) else fn
        p = spec.params(**(params or {}))
        name = spec.name
        spec_breaks = spec.breaks(p)
        base = spec.fn
        func = lambda x: base(x, **p)  # noqa: E731
    elif callable(fn):
        if params:
            raise ValueError("params= is only for registry names; bind parameters into fn instead")
        func = fn
        name = getattr(fn, "__name__", None)
    else:
        raise TypeError(f"fn must be a callable or an activation name, got {type(fn).__name__}")
    w = resolve_weight(weight, lo, hi)
    dfn = derivative_of(func)

    pre = _pre_grid(w, w.lo, w.hi)
    d_pre = dfn(pre)
    if not np.all(np.isfinite(d_pre)):
        raise ValueError(f"f' is not finite on [{w.lo}, {w.hi}]; restrict the range with lo/hi")
    jumps = _detect_jumps(dfn, pre, d_pre)
    brk = np.array(sorted({*map(float, spec_breaks), *map(float, breaks), *jumps}))
    brk = brk[(brk > w.lo) & (brk < w.hi)]

    sym = _symmetry(dfn, w, pre[pre >= 0])
    if explicit is not None:
        g = np.unique(np.concatenate([[w.lo, w.hi], explicit[(explicit > w.lo) & (explicit < w.hi)]]))
        if g.size - 1 < K:
            raise ValueError(f"an explicit grid needs at least {K - 1} candidates inside ({w.lo}, {w.hi})")
        if not (np.array_equal(g, -g[::-1]) and 0.0 in g):
            sym = None
    if symmetric and sym is None:
        raise ValueError(
            "symmetric=True needs a symmetric weight, f' even or odd about a constant, and a grid "
            "mirrored about 0"
        )
    use_sym = sym is not None and symmetric is not False
    if explicit is not None:
        half = g[g >= 0.0]
    elif sym is not None:  # a symmetric problem gets a mirrored grid, whatever ``symmetric`` says
        half = _shaped_grid(dfn, w, 0.0, w.hi, grid // 2, np.abs(brk))
        g = np.concatenate([-half[:0:-1], half])
    else:
        g = _shaped_grid(dfn, w, w.lo, w.hi, grid, brk)
    prob = _problem(dfn, w, g, brk)
    C = prob.costs()
    scuts, stotal = None, math.inf
    if use_sym:
        m = half.size - 1  # index of 0 in g
        _, hcuts = _dp(C[m:, m:], K // 2)
        scuts = sorted([m - c for c in hcuts] + [m] + [m + c for c in hcuts])
        stotal = prob.partition_cost(scuts)
    if symmetric is True:
        cuts = scuts
    else:
        upper = stotal if scuts is not None else _coarse_upper_bound(prob, C, K)
        total, cuts = _dp(C, K, upper)
        if scuts is not None and stotal <= total * (1 + 1e-9) + 1e-15:
            cuts = scuts
    borders = g[np.asarray(cuts, dtype=np.int64)]
    err, levels = _table_moments(dfn, w, borders, None, brk, 4096)
    if sym is not None and cuts == scuts:  # mirrored borders: make the levels exactly symmetric too
        levels = _symmetrize(levels, sym)
        err, _ = _table_moments(dfn, w, borders, levels, brk, 4096)
    # NOTE (ties): a fitted table uses one bucketize flag for all borders, so ops can use torch.bucketize.
    # Only borders on a jump of f' have a meaningful side: follow torch's f' there when all agree.
    at_jump = np.isin(borders, brk)
    flags = [f for f, j in zip(tie_flags(func, borders, levels), at_jump) if j]
    right = (bool(flags and all(flags)),) * borders.size
    return Table(
        borders=torch.tensor(borders, dtype=torch.float64),
        levels=torch.tensor(levels, dtype=torch.float64),
        error=float(err),
        bits=int(bits),
        exact=False,
        right=right,
        name=name,
        weight=w.describe(),
    )


def _symmetrize(levels: np.ndarray, sym: str) -> np.ndarray:
    """Make mirrored levels exactly symmetric (they already are up to rounding)."""
    rev = levels[::-1]
    if sym == "even":
        return 0.5 * (levels + rev)
    c = np.median(levels + rev)
    return 0.5 * (levels + (c - rev))
