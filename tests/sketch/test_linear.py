"""RandomizedLinear / randomized_linear: exact forward and grad_X, unbiased grad_W, saved bytes, dtypes,
compile, autocast, seeding, fallbacks and errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from scipy.stats import norm
from torch import nn

from tightfit.memory import SavedTensorCounter
from tightfit.sketch.functional import randomized_linear
from tightfit.sketch.modules import RandomizedLinear
from tightfit.sketch.sketches import SKETCHES, SketchPlan, draw_seed, sketch_grad, sketch_input

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _pair(d_in: int, d_out: int, dtype=torch.float32, **options) -> tuple[nn.Linear, RandomizedLinear]:  # noqa: ANN001
    ref = nn.Linear(d_in, d_out, dtype=dtype)
    rl = RandomizedLinear(d_in, d_out, dtype=dtype, **options)
    rl.load_state_dict(ref.state_dict())
    return ref, rl


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 5), (11,)])
def test_forward_and_grad_x_exact(sketch: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    ref, rl = _pair(6, 5, dtype, ratio=0.4, sketch=sketch)
    x = torch.randn(*shape, 6, dtype=dtype, requires_grad=True)
    y_ref, y = ref(x), rl(x)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    (gx_ref, gb_ref) = torch.autograd.grad(y_ref, (x, ref.bias), g)
    gx, gb, gw = torch.autograd.grad(y, (x, rl.bias, rl.weight), g)
    assert torch.equal(gx, gx_ref)
    torch.testing.assert_close(gb, gb_ref)  # sum over tokens: exact up to summation order
    assert gw.dtype == dtype and gw.shape == rl.weight.shape and torch.isfinite(gw).all()


def test_same_init_and_state_dict_keys_as_linear() -> None:
    torch.manual_seed(3)
    ref = nn.Linear(7, 4)
    torch.manual_seed(3)
    rl = RandomizedLinear(7, 4, ratio=0.5)
    assert list(rl.state_dict()) == list(ref.state_dict())
    assert torch.equal(rl.weight, ref.weight) and torch.equal(rl.bias, ref.bias)
    assert RandomizedLinear(7, 4, bias=False, k=3).bias is None


def _grad_w_draws(rl: RandomizedLinear, x: torch.Tensor, g: torch.Tensor, draws: int) -> torch.Tensor:
    out = torch.empty(draws, *rl.weight.shape, dtype=torch.float64)
    for i in range(draws):
        (gw,) = torch.autograd.grad(rl(x), rl.weight, g)
        out[i] = gw
    return out


def _max_z(samples: torch.Tensor, exact: torch.Tensor) -> float:
    se = samples.std(0) / samples.shape[0] ** 0.5
    return ((samples.mean(0) - exact) / se).abs().max().item()


def _bonferroni(elements: int, alpha: float = 1e-3) -> float:
    """|z| threshold: the max of `elements` z-scores exceeds it with probability <= alpha (any dependence)."""
    return float(norm.ppf(1 - alpha / (2 * elements)))


@pytest.mark.parametrize(("sketch", "blocks"), [("gaussian", 1), ("gaussian", 3), ("rademacher", 1),
                                                ("rows", None), ("norm_rows", None)])
def test_grad_w_unbiased_over_2000_seeds(sketch: str, blocks: int | None) -> None:
    """Joint criterion: every element's mean over 2000 draws within the Bonferroni z of the exact grad_W."""
    ref, rl = _pair(5, 4, torch.float64, ratio=0.5, sketch=sketch, blocks=blocks)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    x[0, 1] *= 6  # uneven token norms: exercises norm_rows' weights and the block assignment
    g = torch.randn(3, 4, 4, dtype=torch.float64)
    (exact,) = torch.autograd.grad(ref(x), ref.weight, g)
    samples = _grad_w_draws(rl, x, g, 2000)
    assert _max_z(samples, exact) < _bonferroni(exact.numel())
    assert (samples.std(0) > 0).all()  # it is random


def test_unbiasedness_criterion_has_power() -> None:
    """Negative control: row sampling without the N/k rescaling (biased by k/N) must fail the criterion."""
    x = torch.randn(12, 5, dtype=torch.float64)
    g = torch.randn(12, 4, dtype=torch.float64)
    exact = g.t() @ x
    plan = SketchPlan("rows", 12, 6)
    samples = torch.stack([sketch_grad(g, s, plan, None).t() @ (sketch_input(x, s, plan)[0] * 6 / 12)
                           for s in (draw_seed() for _ in range(2000))])
    assert _max_z(samples, exact) > _bonferroni(exact.numel())


def _analytic_variance(kind: str, x: torch.Tensor, g: torch.Tensor, k: int, m: int = 1) -> float:
    """The variance formulas documented in tightfit.sketch.sketches (total over grad_W's entries)."""
    n = x.shape[0]
    xx, gg = (x * x).sum(1), (g * g).sum(1)
    xtg2 = ((g.t() @ x) ** 2).sum().item()
    d = (xx * gg).sum().item()
    full = (xx.sum() * gg.sum()).item()
    if kind in ("gaussian", "rademacher"):
        b = -(-n // m)
        rho = (b - 1) / (n - 1)
        v = (m / k) * (2 * d + rho * (full + xtg2 - 2 * d))
        return v - (m / k) * 2 * d if kind == "rademacher" else v
    if kind == "rows":
        return n * (n - k) / (k * (n - 1)) * (d - xtg2 / n)
    norms = xx.sqrt()
    p = 0.9 * norms / norms.sum() + 0.1 / n
    return ((xx * gg / p).sum().item() - xtg2) / k


@pytest.mark.parametrize(("sketch", "blocks"), [("gaussian", 1), ("gaussian", 4), ("rademacher", 1),
                                                ("rows", None), ("norm_rows", None)])
def test_variance_matches_documented_formula(sketch: str, blocks: int | None) -> None:
    """Monte Carlo variance of the estimate vs the formulas the diagnostics use (equal blocks: 16 = 4 x 4)."""
    x = torch.randn(16, 3, dtype=torch.float64)
    x[2] *= 5
    g = torch.randn(16, 2, dtype=torch.float64)
    k = 8
    plan = SketchPlan(sketch, 16, k, blocks or 1)
    exact = g.t() @ x
    draws = []
    for _ in range(2000):
        s = draw_seed()
        sx, idx = sketch_input(x, s, plan)
        draws.append(sketch_grad(g, s, plan, idx).t() @ sx)
    measured = ((torch.stack(draws) - exact) ** 2).sum((1, 2)).mean().item()
    assert measured == pytest.approx(_analytic_variance(sketch, x, g, k, blocks or 1), rel=0.12)


class _SavedCount(torch.autograd.graph.saved_tensors_hooks):
    """Independent counter for the test: distinct storages saved, parameters excluded."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: dict[int, int] = {}
        super().__init__(self._pack, lambda t: t)

    def __enter__(self) -> _SavedCount:
        super().__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in self.skip:
            self.seen[st.data_ptr()] = st.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())


@pytest.mark.parametrize("sketch", SKETCHES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_saved_bytes_are_the_sketch(sketch: str, dtype: torch.dtype) -> None:
    d_in, n, ratio = 24, 50, 0.2
    rl = RandomizedLinear(d_in, 16, ratio=ratio, sketch=sketch, dtype=dtype)
    x = torch.randn(5, 10, d_in, dtype=dtype, requires_grad=True)
    k = 10  # ceil(0.2 * 50)
    expected = k * d_in * x.element_size() + 8 + (8 * k if sketch == "norm_rows" else 0)
    with SavedTensorCounter(exclude=[rl, x]) as counter:
        y = rl(x)
    with _SavedCount([rl.weight, rl.bias, x]) as mine:
        y2 = rl(x)
    assert counter.bytes == expected == mine.bytes
    ref = nn.Linear(d_in, 16, dtype=dtype)
    with SavedTensorCounter(exclude=[ref, x]) as base:
        ref(x * 2)  # an activation (not an excluded input): nn.Linear keeps all of it
    assert base.bytes == n * d_in * x.element_size()
    y.sum().backward()
    y2.sum().backward()


def test_fresh_randomness_every_step_and_reproducible_under_manual_seed() -> None:
    rl = RandomizedLinear(6, 3, ratio=0.3, sketch="gaussian")
    x = torch.randn(4, 5, 6)

    def grads() -> list[torch.Tensor]:
        return [torch.autograd.grad(rl(x).square().sum(), rl.weight)[0] for _ in range(2)]

    torch.manual_seed(123)
    a1, a2 = grads()
    torch.manual_seed(123)
    b1, b2 = grads()
    assert not torch.equal(a1, a2)  # a new sketch each step
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # same seeds, same sketches


def test_explicit_seed_is_used_in_forward_and_backward() -> None:
    x = torch.randn(20, 4)
    w = torch.randn(3, 4, requires_grad=True)
    g = torch.randn(20, 3)
    (a,) = torch.autograd.grad(randomized_linear(x, w, k=5, sketch="rows", seed=7), w, g)
    (b,) = torch.autograd.grad(randomized_linear(x, w, k=5, sketch="rows", seed=7), w, g)
    assert torch.equal(a, b)
    idx = torch.randperm(20, generator=torch.Generator().manual_seed(7))[:5].sort().values
    torch.testing.assert_close(a, g[idx].t() @ x[idx] * 4)  # the documented estimator, by hand


def test_small_n_falls_back_to_exact_with_a_warning() -> None:
    ref, rl = _pair(4, 3, k=8)
    x = torch.randn(8, 4)
    with pytest.warns(UserWarning, match="exact"):
        y = rl(x)
    (gw,) = torch.autograd.grad(y.sum(), rl.weight)
    (gw_ref,) = torch.autograd.grad(ref(x).sum(), ref.weight)
    assert torch.equal(gw, gw_ref)
    _, rl_min = _pair(4, 3, ratio=0.5, min_tokens=100)
    with pytest.warns(UserWarning, match="min_tokens"):
        rl_min(x)
    _, full = _pair(4, 3, ratio=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ratio=1 is exact on purpose: no warning
        full(x)


def test_bad_input_errors() -> None:
    for bad in (0, -0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="ratio"):
            RandomizedLinear(4, 3, ratio=bad)
    with pytest.raises(ValueError, match="k must"):
        RandomizedLinear(4, 3, k=0)
    with pytest.raises(ValueError, match="either ratio= or k="):
        RandomizedLinear(4, 3, ratio=0.5, k=2)
    with pytest.raises(ValueError, match="ratio= .* or k="):
        RandomizedLinear(4, 3)
    with pytest.raises(ValueError, match="unknown sketch 'dct'"):
        RandomizedLinear(4, 3, ratio=0.5, sketch="dct")
    with pytest.raises(TypeError, match="floating-point dtype"):
        RandomizedLinear(4, 3, ratio=0.5, dtype=torch.int32)
    rl = RandomizedLinear(4, 3, k=9)
    with pytest.raises(ValueError, match="k=9 is larger than the number of tokens N=8"):
        rl(torch.randn(2, 4, 4))
    with pytest.raises(TypeError, match="floating-point input"):
        rl(torch.ones(2, 4, dtype=torch.long))


def test_frozen_weight_runs_plain_linear() -> None:
    ref, rl = _pair(6, 4, ratio=0.25)
    rl.weight.requires_grad_(False)
    x = torch.randn(10, 6, requires_grad=True)
    with SavedTensorCounter(exclude=[rl, x]) as c:
        y = rl(x)
    assert c.bytes == 0 and torch.equal(y, ref(x))


@pytest.mark.parametrize("sketch", ["gaussian", "rows", "norm_rows"])
def test_torch_compile_aot_eager_fullgraph(sketch: str) -> None:
    torch._dynamo.reset()
    _, rl = _pair(6, 5, ratio=0.5, sketch=sketch)
    compiled = torch.compile(rl, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 8, 6, requires_grad=True)
    g = torch.randn(3, 8, 5)

    def run(f) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
        y = f(x)
        return (y, *torch.autograd.grad(y, (x, rl.weight), g))

    torch.manual_seed(5)
    y, gx, gw = run(compiled)
    _, _, gw_next = run(compiled)
    torch.manual_seed(5)
    _, _, gw_again = run(compiled)
    y_e, gx_e, _ = run(rl)
    assert torch.equal(y, y_e)
    torch.testing.assert_close(gx, gx_e)
    assert torch.equal(gw, gw_again) and not torch.equal(gw, gw_next)  # reproducible, fresh every step
    if sketch != "gaussian":
        return  # one compile with an explicit seed is enough (each compile costs seconds)
    # with an explicit seed the compiled op computes exactly the eager estimate
    seed = torch.tensor(11)

    def fixed(t: torch.Tensor) -> torch.Tensor:
        return randomized_linear(t, rl.weight, rl.bias, ratio=0.5, sketch=sketch, seed=seed)

    fn = torch.compile(fixed, backend="aot_eager", fullgraph=True)
    (gw_c,) = torch.autograd.grad(fn(x), rl.weight, g)
    (gw_e,) = torch.autograd.grad(fixed(x), rl.weight, g)
    torch.testing.assert_close(gw_c, gw_e)


def test_autocast_cpu_bf16() -> None:
    ref, rl = _pair(8, 6, ratio=0.25, sketch="gaussian")
    x = torch.randn(4, 10, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = ref(x), rl(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    g = torch.randn_like(y)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    gx, gw = torch.autograd.grad(y, (x, rl.weight), g)
    assert torch.equal(gx, gx_ref) and gw.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16), SavedTensorCounter(exclude=[rl, x]) as c:
        rl(x)
    # saved: the bf16 sketch (10 x 8 x 2 bytes), the seed, and the bf16 weight copy autocast makes for linear
    assert c.bytes == 10 * 8 * 2 + 8 + 6 * 8 * 2


def test_layer_seed_draws_no_random_number_and_travels_with_copies() -> None:
    import pickle

    from tightfit.sketch import LayerSeed, StepClock

    torch.manual_seed(0)
    layer = RandomizedLinear(16, 8, ratio=0.5)
    clock = StepClock()
    layer.seeding = LayerSeed(7, 0, clock)
    x = torch.randn(64, 16)

    def grad(module: torch.nn.Module) -> torch.Tensor:
        module.weight.grad = None
        module(x).square().sum().backward()
        return module.weight.grad.clone()

    state = torch.get_rng_state()
    first = grad(layer)
    assert torch.equal(state, torch.get_rng_state())  # nothing drawn from the global generator
    assert torch.equal(first, grad(layer))  # same step, same RNG state: the same sketch
    copied = pickle.loads(pickle.dumps(layer))
    assert torch.equal(first, grad(copied))
    clock()  # the next step: another sketch
    assert not torch.equal(first, grad(layer))
    assert torch.equal(first, grad(copied))  # the copy has its own clock
