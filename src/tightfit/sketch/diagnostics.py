"""`variance(model, batches)`: the noise a sketch adds to grad_W, next to minibatch-SGD noise, per layer.

The estimator (per layer and batch; X: N x d_in layer input, G: N x d_out gradient of the loss w.r.t. the
layer output, a_s = G_sᵀX_s the gradient contribution of sample s, Σ_s a_s = GᵀX):

- SGD variance: Var_SGD = B/(B−1) · Σ_s ‖a_s − ā‖²_F. This is the unbiased estimate of the total variance
  of the minibatch gradient Σ_s a_s when its B samples are redrawn i.i.d. from the data (the paper's D_SGD,
  with samples, not tokens, as the unit). It needs B >= 2 samples per batch. The leading dim is the sample
  dim; a 2-D input makes each row a sample.
- Sketch variance: Var_S = E_S ‖(SG)ᵀ(SX) − GᵀX‖²_F for this batch, from the closed forms in
  tightfit.sketch.sketches (tests check them against Monte Carlo). It is computed for every ratio on a
  grid, so one pass recommends a ratio per layer. At the layer's current ratio, `draws` Monte Carlo
  sketches also give a measured value (ratio of means over batches).
- Both are averaged over the batches. The recommendation is the smallest grid ratio with
  mean Var_S <= tolerance · mean Var_SGD. The default tolerance 1.0 allows the sketch to add at most as
  much variance as SGD already has, which is no worse than halving the batch size.

Costs: one forward and one backward per batch, plus keeping every measured layer's X and G of that batch.
Parameter .grad fields are not touched, and the global RNG state is restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tightfit._rng import forked_rng
from tightfit._step import call_model, loss_of
from tightfit.sketch.convert import find_candidates
from tightfit.sketch.modules import RandomizedConv1D, RandomizedLinear
from tightfit.sketch.sketches import draw_seed, norm_row_probs, plan_sketch, sketch_grad, sketch_input

__all__ = ["variance", "VarianceReport", "LayerVariance", "sketch_variance"]

DEFAULT_RATIOS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


@dataclass
class LayerVariance:
    """Per layer: mean SGD and sketch variances (total over grad_W's entries) and the recommendation."""

    path: str
    sketch: str
    tokens: float
    samples: float
    ratio: float | None  # the layer's current ratio (None: not converted, or sized by k)
    sgd: float
    sketched: float | None  # closed form at the current ratio
    measured: float | None  # Monte Carlo at the current ratio
    curve: dict[float, float] = field(default_factory=dict)  # ratio -> closed-form sketch variance
    recommended: float = 1.0

    @property
    def relative(self) -> float | None:
        """Sketch variance at the current ratio as a fraction of SGD variance."""
        return None if self.sketched is None or self.sgd <= 0 else self.sketched / self.sgd


@dataclass
class VarianceReport:
    """What `variance` measured; print it for a table, `to_dict()` for JSON."""

    layers: list[LayerVariance]
    tolerance: float
    batches: int

    def __str__(self) -> str:
        lines = [
            f"sketch variance vs minibatch-SGD variance over {self.batches} batch(es); recommended = "
            f"smallest ratio with sketch variance <= {self.tolerance:g} x SGD variance",
            f"{'layer':<40} {'sketch':<10} {'tokens':>7} {'ratio':>6} {'SGD var':>10} {'sketch var':>10} "
            f"{'measured':>10} {'/SGD':>7} {'recommend':>9}",
        ]
        for lv in self.layers:
            ratio = "-" if lv.ratio is None else f"{lv.ratio:g}"
            sk = "-" if lv.sketched is None else f"{lv.sketched:.3e}"
            me = "-" if lv.measured is None else f"{lv.measured:.3e}"
            rel = "-" if lv.relative is None else f"{lv.relative:.2f}"
            lines.append(
                f"{lv.path[-40:]:<40} {lv.sketch:<10} {lv.tokens:>7.0f} {ratio:>6} {lv.sgd:>10.3e} {sk:>10} "
                f"{me:>10} {rel:>7} {lv.recommended:>9g}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "batches": self.batches,
            "layers": [
                {**asdict(lv), "curve": {str(r): v for r, v in lv.curve.items()}} for lv in self.layers
            ],
        }


@dataclass
class _Stats:
    n: int
    full: float  # ‖X‖²‖G‖²
    diag: float  # D = Σ_t ‖x_t‖²‖g_t‖²
    xtg2: float  # ‖GᵀX‖²
    weighted: float  # Σ_t ‖x_t‖²‖g_t‖² / p_t (norm_rows probabilities)
    sgd: float
    samples: int


def _batch_stats(x: Tensor, g: Tensor) -> _Stats:
    """Sufficient statistics of one call: x (..., d_in) and g (..., d_out) with the same leading dims."""
    x = x.detach().double()
    g = g.detach().double()
    samples = x.shape[0] if x.dim() > 2 else x.reshape(-1, x.shape[-1]).shape[0]
    xs = x.reshape(samples, -1, x.shape[-1])  # (B, T, d_in)
    gs = g.reshape(samples, -1, g.shape[-1])
    x2 = xs.reshape(-1, xs.shape[-1])
    g2 = gs.reshape(-1, gs.shape[-1])
    xx = (x2 * x2).sum(1)
    gg = (g2 * g2).sum(1)
    total = g2.t() @ x2
    xtg2 = float((total * total).sum())
    # Σ_s ‖a_s‖² by the Gram identity ‖G_sᵀX_s‖² = Σ (X_s X_sᵀ) ∘ (G_s G_sᵀ): no per-sample d_out x d_in
    per_sample = (torch.bmm(xs, xs.transpose(1, 2)) * torch.bmm(gs, gs.transpose(1, 2))).sum()
    sgd = (samples / (samples - 1)) * float(per_sample) - xtg2 / (samples - 1) if samples > 1 else math.nan
    p = norm_row_probs(x2)
    return _Stats(
        n=x2.shape[0], full=float(xx.sum() * gg.sum()), diag=float((xx * gg).sum()), xtg2=xtg2,
        weighted=float((xx * gg / p).sum()), sgd=sgd, samples=samples,
    )


def sketch_variance(kind: str, stats: _Stats, k: int, blocks: int | None, d_in: int, d_out: int) -> float:
    """Closed-form E‖(SG)ᵀ(SX) − GᵀX‖²_F for a sketch with k rows (see tightfit.sketch.sketches)."""
    n = stats.n
    if k >= n:
        return 0.0
    if kind in ("gaussian", "rademacher"):
        m = plan_sketch(kind, n, k, blocks, d_in, d_out).blocks
        b = -(-n // m)
        rho = (b - 1) / (n - 1) if n > 1 else 1.0
        v = (m / k) * (2 * stats.diag + rho * (stats.full + stats.xtg2 - 2 * stats.diag))
        return v - (m / k) * 2 * stats.diag if kind == "rademacher" else v
    if kind == "rows":
        return n * (n - k) / (k * (n - 1)) * (stats.diag - stats.xtg2 / n)
    return (stats.weighted - stats.xtg2) / k


def _monte_carlo(x: Tensor, g: Tensor, kind: str, k: int, blocks: int | None, draws: int) -> float:
    x2 = x.detach().reshape(-1, x.shape[-1]).double()
    g2 = g.detach().reshape(-1, g.shape[-1]).double()
    exact = g2.t() @ x2
    plan = plan_sketch(kind, x2.shape[0], k, blocks, x2.shape[1], g2.shape[1])
    total = 0.0
    for _ in range(draws):
        seed = draw_seed()
        sx, idx = sketch_input(x2, seed, plan)
        est = sketch_grad(g2, seed, plan, idx).t() @ sx
        total += float(((est - exact) ** 2).sum())
    return total / draws


_LayerInfo = tuple[nn.Module, str, "float | None", "int | None"]  # module, sketch, ratio, blocks


def _layers(model: nn.Module, sketch: str | None) -> dict[str, _LayerInfo]:
    found = {
        path: (m, m.sketch, m.ratio, m.blocks)
        for path, m in model.named_modules()
        if isinstance(m, (RandomizedLinear, RandomizedConv1D))
    }
    if found:
        return found
    candidates, _ = find_candidates(model)
    return {path: (m, sketch or "gaussian", None, None) for path, m in candidates.items()}


def _capture(
    model: nn.Module, layers: dict[str, _LayerInfo], batch: Any, loss_fn: Callable[[Any], Tensor] | None
) -> dict[str, list[tuple[Tensor, Tensor]]]:
    """One forward and backward: every call's (input X, gradient G of the loss w.r.t. the output)."""
    calls: list[tuple[str, Tensor, Tensor]] = []

    def make_hook(path: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
            calls.append((path, args[0].detach(), out))

        return hook

    handles = [info[0].register_forward_hook(make_hook(path)) for path, info in layers.items()]
    try:
        loss = loss_of(call_model(model, batch), loss_fn)
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(loss, [out for _, _, out in calls], allow_unused=True)
    result: dict[str, list[tuple[Tensor, Tensor]]] = {p: [] for p in layers}
    for (path, x, out), g in zip(calls, grads):
        result[path].append((x, torch.zeros_like(out) if g is None else g))
    return result


def variance(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any], Tensor] | None = None,
    *,
    tolerance: float = 1.0,
    ratios: Iterable[float] = DEFAULT_RATIOS,
    draws: int = 4,
    sketch: str | None = None,
) -> VarianceReport:
    """Per converted layer (RandomizedLinear / RandomizedConv1D; if there are none, every nn.Linear and
    GPT-2 Conv1D, as `sketch` or "gaussian"), the sketch-induced variance of grad_W against
    minibatch-SGD variance. Recommends per layer the smallest ratio in `ratios` whose sketch variance is
    at most `tolerance` x the SGD variance. See the module docstring for the estimator."""
    if tolerance <= 0:
        raise ValueError(f"tolerance must be > 0 (a fraction of the SGD variance), got {tolerance}")
    grid = sorted({float(r) for r in ratios})
    if not grid or any(not 0 < r <= 1 for r in grid):
        raise ValueError(f"ratios must be in (0, 1], got {grid}")
    layers = _layers(model, sketch)
    if not layers:
        raise ValueError("the model has no linear layers to measure (nn.Linear, Conv1D, RandomizedLinear)")
    sums = {p: dict.fromkeys(("sgd", "cur", "mc", "n", "b"), 0.0) for p in layers}
    curves: dict[str, dict[float, float]] = {p: dict.fromkeys(grid, 0.0) for p in layers}
    count = 0
    with forked_rng([*model.parameters(), *model.buffers()]):
        for batch in batches:
            captured = _capture(model, layers, batch, loss_fn)
            count += 1
            for path, (_module, kind, ratio, blocks) in layers.items():
                acc = sums[path]
                for x, g in captured[path]:
                    st = _batch_stats(x, g)
                    d_in, d_out = x.shape[-1], g.shape[-1]
                    acc["sgd"] += st.sgd
                    acc["n"] += st.n
                    acc["b"] += st.samples
                    for r in grid:
                        curves[path][r] += sketch_variance(kind, st, math.ceil(r * st.n), blocks, d_in, d_out)
                    if ratio is not None:
                        k = min(st.n, math.ceil(ratio * st.n))
                        acc["cur"] += sketch_variance(kind, st, k, blocks, d_in, d_out)
                        if draws > 0 and k < st.n:
                            acc["mc"] += _monte_carlo(x, g, kind, k, blocks, draws)
    if count == 0:
        raise ValueError("batches was empty: give at least one batch (of at least 2 samples)")
    result = []
    for path, (_module, kind, ratio, _blocks) in layers.items():
        acc = sums[path]
        sgd = acc["sgd"] / count
        curve = {r: v / count for r, v in curves[path].items()}
        ok = [r for r in grid if not math.isnan(sgd) and curve[r] <= tolerance * sgd]
        result.append(
            LayerVariance(
                path=path, sketch=kind, tokens=acc["n"] / count, samples=acc["b"] / count, ratio=ratio,
                sgd=sgd, sketched=acc["cur"] / count if ratio is not None else None,
                measured=acc["mc"] / count if (ratio is not None and draws > 0) else None,
                curve=curve, recommended=min(ok) if ok else 1.0,
            )
        )
    return VarianceReport(layers=result, tolerance=tolerance, batches=count)
