"""The sketches S (k x N over the N token rows) with E[SᵀS] = I, drawn from a seed, applied to X and G.

A linear layer needs X (N x d_in) only for grad_W = Gᵀ X. Keeping SX (k x d_in) instead and computing
(SG)ᵀ(SX) = Gᵀ SᵀS X in backward gives an unbiased grad_W whenever E[SᵀS] = I and S is drawn independently
of X and G. S is never stored: it is regenerated in backward from a 64-bit seed with a private
`torch.Generator`, so the forward and backward draws are the same and nothing global is touched.

Sketches (``kind``):

- ``gaussian``: S = blockdiag(S_1..S_m) P. P is a uniformly random token permutation, block j covers
  b_j ≈ N/m permuted tokens with k_j ≈ k/m rows of iid N(0, 1/k_j) entries. m = 1 is the textbook dense
  Gaussian sketch: Var = (‖X‖²‖G‖² + ‖GᵀX‖²)/k (Frobenius norms, summed over entries of grad_W). m > 1
  costs m times fewer FLOPs and random numbers. Averaged over the random permutation, the variance is
  (m/k)[2D + ρ(‖X‖²‖G‖² + ‖GᵀX‖² − 2D)] with D = Σ_t ‖x_t‖²‖g_t‖² and ρ = (b−1)/(N−1). That is the dense
  variance plus about (m−1)/k·D. D is ≈ ‖X‖²‖G‖²/N for tokens of similar norms, so the extra is
  negligible for m ≪ N. It only matters when a few tokens carry most of ‖x_t‖‖g_t‖.
- ``rademacher``: the same structure with ±1/sqrt(k_j) entries. Var = the Gaussian one minus (m/k)·2D
  (never larger).
- ``rows``: uniform sampling of k distinct rows (without replacement), rescaled by N/k. Gathers only,
  no matmul. Var = N(N−k)/(k(N−1)) · (D − ‖GᵀX‖²/N); exact at k = N.
- ``norm_rows``: importance sampling of k rows *with* replacement, p_t ∝ ‖x_t‖ mixed with 10% uniform,
  rescaled by 1/(k p_t). Unbiased: every row with x_t ≠ 0 has p_t > 0, and rows with x_t = 0 contribute
  nothing. Var = (Σ_t ‖x_t‖²‖g_t‖²/p_t − ‖GᵀX‖²)/k. The variance-optimal column-row-sampling
  probabilities are ∝ ‖x_t‖‖g_t‖, but G does not exist yet at forward time, so only ‖x_t‖ is used. This
  beats ``rows`` when token norms vary a lot and ‖g_t‖ does not grow where ‖x_t‖ shrinks. It can be
  worse when ‖g_t‖ is anti-correlated with ‖x_t‖. The 10% uniform part caps the weights at 10N/k,
  which bounds the worst case. Sampling is with replacement, so duplicates waste rows. The sampled
  indices are stored (k int64, 8k bytes), because regenerating them would need all N norms.

NOTE (seed): the seed is a 0-dim int64 CPU tensor, drawn from the global torch generator at forward time
(`draw_seed`). That makes runs reproducible under `torch.manual_seed` and gives a fresh sketch every step.
The draws use `torch.Generator(device)`: Philox on CUDA (counter-based), MT19937 on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SKETCHES",
    "UNBIASED",
    "SketchPlan",
    "plan_sketch",
    "auto_blocks",
    "draw_seed",
    "sketch_input",
    "sketch_grad",
    "norm_row_probs",
    "sketch_grad_weight",
    "sketch_matrix",
]

SKETCHES = ("gaussian", "rademacher", "rows", "norm_rows")
UNBIASED = SKETCHES  # all four are unbiased estimators of grad_W (tested over 2000 seeds)
_DENSE = ("gaussian", "rademacher")
_UNIFORM_MIX = 0.1  # norm_rows: share of uniform probability (caps the importance weights at N/(0.1 k))
# auto_blocks: the sketch matmuls (forward S·X, backward S·G) may cost this share of the layer's 3 GEMMs
_SKETCH_COST_SHARE = 0.05
_MIN_BLOCK_ROWS = 32


@dataclass(frozen=True)
class SketchPlan:
    """How one call sketches its N token rows: kind, k rows kept, m diagonal blocks (dense kinds)."""

    kind: str
    n: int
    k: int
    blocks: int = 1

    @property
    def block_tokens(self) -> int:
        return -(-self.n // self.blocks)


def draw_seed() -> Tensor:
    """A fresh 62-bit seed from the global CPU generator (reproducible under torch.manual_seed)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def auto_blocks(k: int, n: int, d_in: int, d_out: int) -> int:
    """Fewest diagonal blocks m keeping the sketch matmuls 2k(N/m)(d_in+d_out) within 5% of 6N·d_in·d_out,
    with at least 32 sketch rows per block."""
    m = math.ceil(k * (d_in + d_out) / (3 * _SKETCH_COST_SHARE * d_in * d_out))
    # at least _MIN_BLOCK_ROWS rows per block: tiny blocks cost more in per-call overhead than they save
    return max(1, min(m, k // _MIN_BLOCK_ROWS, n))


def plan_sketch(kind: str, n: int, k: int, blocks: int | None, d_in: int, d_out: int) -> SketchPlan:
    """Resolve the number of blocks (dense kinds only) so that every block has tokens and sketch rows."""
    if kind not in _DENSE:
        return SketchPlan(kind, n, k, 1)
    m = auto_blocks(k, n, d_in, d_out) if blocks is None else max(1, min(blocks, k, n))
    b = -(-n // m)
    m = -(-n // b)  # no empty trailing block
    return SketchPlan(kind, n, k, m)


def _generator(seed: Tensor, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed.item()))
    return g


def _rows_per_block(k: int, m: int) -> list[int]:
    return [k // m + (1 if j < k % m else 0) for j in range(m)]


# ------------------------------------------------------------------------------- random draws (custom ops)
# The draws are custom ops so that torch.compile treats them as opaque (a private Generator cannot be traced)
# while everything around them (gathers, matmuls) stays visible to the compiler.


_GOLDEN = 0x9E3779B97F4A7C15  # sub-seed stride for the blocks of one sketch


@torch.library.custom_op("tightfit::sketch_block_draw", mutates_args=())
def _block_draw(
    seed: Tensor, block: int, kind: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Block `block` of a gaussian/rademacher sketch: rows x cols, entries of variance 1/rows."""
    sub = torch.tensor((int(seed.item()) + _GOLDEN * (block + 1)) % 2**63, dtype=torch.int64)
    g = _generator(sub, device)
    if kind == "gaussian":
        s = torch.randn(rows, cols, generator=g, device=device, dtype=dtype)
        return s.mul_(rows**-0.5)
    s = torch.randint(0, 2, (rows, cols), generator=g, device=device, dtype=torch.int8).to(dtype)
    return s.mul_(2 * rows**-0.5).sub_(rows**-0.5)


@_block_draw.register_fake
def _(seed, block, kind, rows, cols, dtype, device):
    return torch.empty(rows, cols, dtype=dtype, device=device)


@torch.library.custom_op("tightfit::sketch_perm_draw", mutates_args=())
def _perm_draw(seed: Tensor, n: int, device: torch.device) -> Tensor:
    """The random token permutation that assigns tokens to the blocks."""
    return torch.randperm(n, generator=_generator(seed, device), device=device)


@_perm_draw.register_fake
def _(seed, n, device):
    return torch.empty(n, dtype=torch.long, device=device)


@torch.library.custom_op("tightfit::sketch_rows_draw", mutates_args=())
def _rows_draw(seed: Tensor, n: int, k: int, device: torch.device) -> Tensor:
    """k distinct uniform row indices, sorted (better locality for the gathers)."""
    g = _generator(seed, device)
    return torch.randperm(n, generator=g, device=device)[:k].sort().values


@_rows_draw.register_fake
def _(seed, n, k, device):
    return torch.empty(k, dtype=torch.long, device=device)


@torch.library.custom_op("tightfit::sketch_multinomial_draw", mutates_args=())
def _multinomial_draw(seed: Tensor, probs: Tensor, k: int) -> Tensor:
    """k row indices drawn with replacement from `probs` (float32, sums to 1)."""
    g = _generator(seed, probs.device)
    return torch.multinomial(probs, k, replacement=True, generator=g).sort().values


@_multinomial_draw.register_fake
def _(seed, probs, k):
    return torch.empty(k, dtype=torch.long, device=probs.device)


# ------------------------------------------------------------------------------------- applying a sketch
def _apply_dense(a: Tensor, seed: Tensor, plan: SketchPlan) -> Tensor:
    """S·a block by block: temporaries are one block of S and of gathered rows, never a copy of a."""
    n, d = a.shape
    m, b = plan.blocks, plan.block_tokens
    if m == 1:
        return _block_draw(seed, 0, plan.kind, plan.k, n, a.dtype, a.device) @ a
    perm = _perm_draw(seed, n, a.device)
    out = a.new_empty(plan.k, d)
    r = 0
    for j, kj in enumerate(_rows_per_block(plan.k, m)):
        t0, t1 = j * b, min(n, (j + 1) * b)
        s = _block_draw(seed, j, plan.kind, kj, t1 - t0, a.dtype, a.device)
        out[r : r + kj] = s @ a.index_select(0, perm[t0:t1])
        r += kj
    return out


def sketch_input(x: Tensor, seed: Tensor, plan: SketchPlan) -> tuple[Tensor, Tensor | None]:
    """S·X for the 2-D token matrix x (N x d); also the row indices for ``norm_rows`` (else None).

    Scales are folded into S·X, so `sketch_grad` applies the unscaled selection (or the same S) to G.
    """
    if plan.kind in _DENSE:
        return _apply_dense(x, seed, plan), None
    n = x.shape[0]
    if plan.kind == "rows":
        idx = _rows_draw(seed, n, plan.k, x.device)
        return x.index_select(0, idx).mul_(n / plan.k), None
    if plan.kind == "norm_rows":
        p = norm_row_probs(x)
        idx = _multinomial_draw(seed, p, plan.k)
        w = (1.0 / (plan.k * p.index_select(0, idx))).to(x.dtype).unsqueeze(1)
        return x.index_select(0, idx).mul_(w), idx
    raise ValueError(f"unknown sketch {plan.kind!r}; valid: {', '.join(SKETCHES)}")


def sketch_grad(g: Tensor, seed: Tensor, plan: SketchPlan, idx: Tensor | None) -> Tensor:
    """The matching S·G (k x d_out) for the backward pass, regenerated from the same seed."""
    if plan.kind in _DENSE:
        return _apply_dense(g, seed, plan)
    if plan.kind == "rows":
        return g.index_select(0, _rows_draw(seed, g.shape[0], plan.k, g.device))
    if plan.kind == "norm_rows":
        assert idx is not None
        return g.index_select(0, idx)
    raise ValueError(f"unknown sketch {plan.kind!r}; valid: {', '.join(SKETCHES)}")


_GRAD_CHUNK_ROWS = 512  # rows of S·G formed at a time in `sketch_grad_weight`: bounds the backward temporary


def sketch_grad_weight(g: Tensor, sx: Tensor, seed: Tensor, plan: SketchPlan, idx: Tensor | None) -> Tensor:
    """(S·G)ᵀ(S·X) accumulated block by block (or 512 rows at a time), never forming all of S·G at once.

    Equal to ``sketch_grad(g, ...).t() @ sx`` up to summation order; the temporary is one block of S·G
    (k_j x d_out) instead of k x d_out.
    """
    d_out, d_in = g.shape[1], sx.shape[1]
    sx = sx.to(g.dtype)
    if plan.kind in _DENSE and plan.blocks > 1:
        n, b = plan.n, plan.block_tokens
        perm = _perm_draw(seed, n, g.device)
        out = g.new_zeros(d_out, d_in)
        r = 0
        for j, kj in enumerate(_rows_per_block(plan.k, plan.blocks)):
            t0, t1 = j * b, min(n, (j + 1) * b)
            s = _block_draw(seed, j, plan.kind, kj, t1 - t0, g.dtype, g.device)
            sg = s @ g.index_select(0, perm[t0:t1])
            out.addmm_(sg.t(), sx[r : r + kj])
            r += kj
        return out
    if plan.kind in _DENSE:
        return sketch_grad(g, seed, plan, idx).t() @ sx
    rows = _rows_draw(seed, g.shape[0], plan.k, g.device) if plan.kind == "rows" else idx
    assert rows is not None
    if plan.k <= _GRAD_CHUNK_ROWS:
        return g.index_select(0, rows).t() @ sx
    out = g.new_zeros(d_out, d_in)
    for c in range(0, plan.k, _GRAD_CHUNK_ROWS):
        out.addmm_(g.index_select(0, rows[c : c + _GRAD_CHUNK_ROWS]).t(), sx[c : c + _GRAD_CHUNK_ROWS])
    return out


def sketch_matrix(seed: Tensor, plan: SketchPlan, x: Tensor | None = None) -> Tensor:
    """The explicit k x N matrix S of one draw, for tests and diagnostics (`x` is needed for ``norm_rows``).

    S·X equals `sketch_input` (up to rounding); with the scale folded as in `sketch_input`, (S_G·G)ᵀ(S·X)
    is the estimate, where S_G is S for the dense kinds and the unscaled selection for the row kinds.
    """
    n = plan.n
    eye = torch.eye(n, dtype=torch.float64 if x is None else x.dtype, device=None if x is None else x.device)
    if plan.kind == "norm_rows":
        if x is None:
            raise ValueError("sketch_matrix for norm_rows needs x (the probabilities depend on it)")
        sx, idx = sketch_input(x, seed, plan)
        w = sx.new_zeros(plan.k, n)
        scale = (1.0 / (plan.k * norm_row_probs(x).index_select(0, idx))).to(w.dtype)
        w[torch.arange(plan.k), idx] = scale
        return w
    return sketch_input(eye, seed, plan)[0]


def norm_row_probs(x: Tensor) -> Tensor:
    """norm_rows probabilities: ‖x_t‖/Σ‖x‖ mixed with 10% uniform (uniform when x is all zeros)."""
    norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.promote_types(x.dtype, torch.float32))
    total = norms.sum()
    n = x.shape[0]
    p = torch.where(total > 0, norms / total.clamp_min(1e-30), torch.full_like(norms, 1.0 / n))
    return (1 - _UNIFORM_MIX) * p + _UNIFORM_MIX / n
