"""Registry of pointwise nonlinearities: exact forwards, parameters, derivative breaks, module recognition.

Every entry's ``fn`` computes the same values as the op it stands for (torch.nn.functional, or the exact
expression of a ``transformers.activations`` class), so a few-bit op can call it for its forward and stay
bit-identical to the original. ``kind`` says how the derivative is stored:

- ``"step"``: piecewise linear with one kink, f' takes two values -> an exact 1-bit table;
- ``"band"``: piecewise linear with two kinks (hardtanh, relu6, hardsigmoid, hard/softshrink) -> an exact
  2-bit table (three pieces);
- ``"smooth"``: everything else -> a fitted table (see :mod:`tightfit.fewbit.fit`).

``breaks(params)`` lists the points where f' jumps or kinks (for step/band kinds: the kinks): fitted tables
always have a candidate border there. transformers is never imported here: its classes are recognised by
module and class name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "ActivationSpec", "KINDS", "spec_for_module", "spec_for_name"]

KINDS = ("smooth", "step", "band")


def _no_breaks(params: Mapping[str, Any]) -> tuple[float, ...]:
    return ()


@dataclass(frozen=True, eq=False)
class ActivationSpec:
    """One pointwise nonlinearity: its exact forward, default parameters and how its derivative is stored.

    ``fn(x, **params)`` is the forward (parameters are keyword-only and all have defaults in
    ``defaults``); ``torch_modules`` and ``hf_modules`` (class names in ``transformers.activations``) are
    the module classes that compute it; ``act2fn`` are its names in transformers' ``ACT2FN``;
    ``table_of`` names the entry whose tables it shares when it is the same mathematical function
    computed in a different order (e.g. ``gelu_new`` and ``gelu_tanh``).
    """

    name: str
    fn: Callable[..., Tensor]
    kind: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    breaks: Callable[[Mapping[str, Any]], tuple[float, ...]] = _no_breaks
    torch_modules: tuple[type[nn.Module], ...] = ()
    hf_modules: tuple[str, ...] = ()
    act2fn: tuple[str, ...] = ()
    table_of: str | None = None
    doc: str = ""
    border_rounding: str = "opmath"  # how torch's backward compares x with the kinks (see tables.py)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    def params(self, **overrides: Any) -> dict[str, Any]:
        """Defaults updated with ``overrides``; an unknown parameter name raises ValueError."""
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(f"{self.name} has no parameter(s) {sorted(unknown)}; valid parameters: {valid}")
        out = dict(self.defaults)
        out.update(overrides)
        return out

    def __call__(self, x: Tensor, **params: Any) -> Tensor:
        return self.fn(x, **self.params(**params))

    def derivative(self, x: Tensor, **params: Any) -> Tensor:
        """f'(x) by autograd, with torch's own convention at kinks (e.g. relu'(0) = 0)."""
        xx = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = self(xx, **params)
            (g,) = torch.autograd.grad(y.sum(), xx)
        return g

    def break_points(self, **params: Any) -> tuple[float, ...]:
        """Points where f' jumps (smooth kind) or kinks (step/band kinds), sorted, for these params."""
        return tuple(sorted(float(b) for b in self.breaks(self.params(**params))))

    @property
    def table_name(self) -> str:
        """The registry name whose tables this entry uses."""
        return self.table_of or self.name

    def __repr__(self) -> str:
        return f"ActivationSpec({self.name!r}, kind={self.kind!r}, defaults={dict(self.defaults)})"


# ---------------------------------------------------------------------------------------------------------
# Forwards. Each mirrors its original op exactly (same torch calls in the same order).

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _relu(x: Tensor) -> Tensor:
    return F.relu(x)


def _relu6(x: Tensor) -> Tensor:
    return F.relu6(x)


def _leaky_relu(x: Tensor, negative_slope: float) -> Tensor:
    return F.leaky_relu(x, negative_slope)


def _threshold(x: Tensor, threshold: float, value: float) -> Tensor:
    return F.threshold(x, threshold, value)


def _hardtanh(x: Tensor, min_val: float, max_val: float) -> Tensor:
    if min_val > max_val:
        raise ValueError(f"hardtanh needs min_val <= max_val, got {min_val} > {max_val}")
    return F.hardtanh(x, min_val, max_val)


def _hardshrink(x: Tensor, lambd: float) -> Tensor:
    return F.hardshrink(x, lambd)


def _softshrink(x: Tensor, lambd: float) -> Tensor:
    return F.softshrink(x, lambd)


def _elu(x: Tensor, alpha: float) -> Tensor:
    return F.elu(x, alpha)


def _celu(x: Tensor, alpha: float) -> Tensor:
    return F.celu(x, alpha)


def _softplus(x: Tensor, beta: float, threshold: float) -> Tensor:
    return F.softplus(x, beta, threshold)


def _gelu(x: Tensor) -> Tensor:
    return F.gelu(x)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_python(x: Tensor) -> Tensor:  # transformers GELUActivation(use_gelu_python=True)
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_python_tanh(x: Tensor) -> Tensor:  # transformers GELUTanh(use_gelu_tanh_python=True)
    return x * 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_new(x: Tensor) -> Tensor:  # transformers NewGELUActivation (GPT-2)
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: Tensor) -> Tensor:  # transformers FastGELUActivation
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_accurate(x: Tensor) -> Tensor:  # transformers AccurateGELUActivation
    return 0.5 * x * (1 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3))))


def _quick_gelu(x: Tensor) -> Tensor:  # transformers QuickGELUActivation
    return x * torch.sigmoid(1.702 * x)


def _clipped_gelu(x: Tensor, min: float, max: float) -> Tensor:  # transformers ClippedGELUActivation
    return torch.clip(F.gelu(x), min, max)


def _relu2(x: Tensor) -> Tensor:  # transformers ReLUSquaredActivation
    return torch.square(F.relu(x))


def _laplace(x: Tensor, mu: float, sigma: float) -> Tensor:  # transformers LaplaceActivation
    x = (x - mu).div(sigma * math.sqrt(2.0))
    return 0.5 * (1.0 + torch.erf(x))


def _sqrtsoftplus(x: Tensor) -> Tensor:  # transformers SqrtSoftplusActivation
    return F.softplus(x).sqrt()


# ---------------------------------------------------------------------------------------------------------
# Breaks (kinks of piecewise-linear functions, jumps of f' for smooth ones).


def _gelu_inverse(y: float) -> float:
    """x >= 0 with gelu(x) = y (bisection in float64), for the kinks of ClippedGELU."""
    lo, hi = -0.75, max(1.0, abs(y) + 1.0)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if F.gelu(torch.tensor(mid, dtype=torch.float64)).item() < y:
            lo = mid
        else:
            hi = mid
    return hi


def _clipped_gelu_breaks(p: Mapping[str, Any]) -> tuple[float, ...]:
    out = []
    if p["max"] > -0.17:  # min of gelu is about -0.17: below that the clip never binds above
        out.append(_gelu_inverse(p["max"]))
    return tuple(out)


def _entry(name: str, fn: Callable[..., Tensor], kind: str, **kw: Any) -> ActivationSpec:
    return ActivationSpec(name=name, fn=fn, kind=kind, **kw)


_ENTRIES = [
    # --- piecewise linear: exact tables ---------------------------------------------------------------
    _entry("relu", _relu, "step", breaks=lambda p: (0.0,), torch_modules=(nn.ReLU,), act2fn=("relu",)),
    _entry("leaky_relu", _leaky_relu, "step", defaults={"negative_slope": 0.01},
           breaks=lambda p: (0.0,), torch_modules=(nn.LeakyReLU,), act2fn=("leaky_relu",)),
    _entry("threshold", _threshold, "step", defaults={"threshold": 0.0, "value": 0.0},
           breaks=lambda p: (p["threshold"],), torch_modules=(nn.Threshold,),
           doc="nn.Threshold has no defaults; 0, 0 (= relu) is the registry's default for tables."),
    _entry("relu6", _relu6, "band", breaks=lambda p: (0.0, 6.0), torch_modules=(nn.ReLU6,),
           act2fn=("relu6",)),
    _entry("hardtanh", _hardtanh, "band", defaults={"min_val": -1.0, "max_val": 1.0},
           breaks=lambda p: (p["min_val"], p["max_val"]), torch_modules=(nn.Hardtanh,)),
    _entry("hardsigmoid", F.hardsigmoid, "band", breaks=lambda p: (-3.0, 3.0),
           torch_modules=(nn.Hardsigmoid,)),
    _entry("hardshrink", _hardshrink, "band", defaults={"lambd": 0.5},
           breaks=lambda p: (-p["lambd"], p["lambd"]), torch_modules=(nn.Hardshrink,),
           border_rounding="input"),
    _entry("softshrink", _softshrink, "band", defaults={"lambd": 0.5},
           breaks=lambda p: (-p["lambd"], p["lambd"]), torch_modules=(nn.Softshrink,),
           border_rounding="input"),
    # --- smooth (or with derivative jumps): fitted tables ----------------------------------------------
    _entry("gelu", _gelu, "smooth", torch_modules=(nn.GELU,), hf_modules=("GELUActivation",),
           act2fn=("gelu",)),
    _entry("gelu_tanh", _gelu_tanh, "smooth", torch_modules=(nn.GELU,), hf_modules=("GELUTanh",),
           act2fn=("gelu_pytorch_tanh",), doc="nn.GELU(approximate='tanh')"),
    _entry("gelu_python", _gelu_python, "smooth", table_of="gelu", hf_modules=("GELUActivation",),
           act2fn=("gelu_python",)),
    _entry("gelu_python_tanh", _gelu_python_tanh, "smooth", table_of="gelu_tanh",
           hf_modules=("GELUTanh",), act2fn=("gelu_python_tanh",)),
    _entry("gelu_new", _gelu_new, "smooth", table_of="gelu_tanh", hf_modules=("NewGELUActivation",),
           act2fn=("gelu_new",)),
    _entry("gelu_fast", _gelu_fast, "smooth", table_of="gelu_tanh", hf_modules=("FastGELUActivation",),
           act2fn=("gelu_fast",)),
    _entry("gelu_accurate", _gelu_accurate, "smooth", table_of="gelu_tanh",
           hf_modules=("AccurateGELUActivation",), act2fn=("gelu_accurate",)),
    _entry("quick_gelu", _quick_gelu, "smooth", hf_modules=("QuickGELUActivation",),
           act2fn=("quick_gelu",)),
    _entry("clipped_gelu", _clipped_gelu, "smooth", defaults={"min": -10.0, "max": 10.0},
           breaks=_clipped_gelu_breaks, hf_modules=("ClippedGELUActivation",), act2fn=("gelu_10",)),
    _entry("silu", F.silu, "smooth", torch_modules=(nn.SiLU,), hf_modules=("SiLUActivation",),
           act2fn=("silu", "swish")),
    _entry("mish", F.mish, "smooth", torch_modules=(nn.Mish,), hf_modules=("MishActivation",),
           act2fn=("mish",)),
    _entry("sigmoid", torch.sigmoid, "smooth", torch_modules=(nn.Sigmoid,), act2fn=("sigmoid",)),
    _entry("logsigmoid", F.logsigmoid, "smooth", torch_modules=(nn.LogSigmoid,)),
    _entry("tanh", torch.tanh, "smooth", torch_modules=(nn.Tanh,), act2fn=("tanh",)),
    _entry("softplus", _softplus, "smooth", defaults={"beta": 1.0, "threshold": 20.0},
           breaks=lambda p: (p["threshold"] / p["beta"],), torch_modules=(nn.Softplus,)),
    _entry("softsign", F.softsign, "smooth", torch_modules=(nn.Softsign,)),
    _entry("tanhshrink", F.tanhshrink, "smooth", torch_modules=(nn.Tanhshrink,)),
    _entry("elu", _elu, "smooth", defaults={"alpha": 1.0}, breaks=lambda p: (0.0,),
           torch_modules=(nn.ELU,)),
    _entry("celu", _celu, "smooth", defaults={"alpha": 1.0}, breaks=lambda p: (0.0,),
           torch_modules=(nn.CELU,)),
    _entry("selu", F.selu, "smooth", breaks=lambda p: (0.0,), torch_modules=(nn.SELU,)),
    _entry("hardswish", F.hardswish, "smooth", breaks=lambda p: (-3.0, 3.0),
           torch_modules=(nn.Hardswish,), act2fn=("hardswish",)),
    _entry("relu2", _relu2, "smooth", breaks=lambda p: (0.0,), hf_modules=("ReLUSquaredActivation",),
           act2fn=("relu2",)),
    _entry("laplace", _laplace, "smooth", defaults={"mu": 0.707107, "sigma": 0.282095},
           hf_modules=("LaplaceActivation",), act2fn=("laplace",)),
    _entry("sqrtsoftplus", _sqrtsoftplus, "smooth", hf_modules=("SqrtSoftplusActivation",),
           act2fn=("sqrtsoftplus",)),
]

ACTIVATIONS: dict[str, ActivationSpec] = {e.name: e for e in _ENTRIES}
"""Every supported nonlinearity by registry name (torch.nn.functional's name where there is one)."""

_BY_ACT2FN: dict[str, str] = {n: e.name for e in _ENTRIES for n in e.act2fn}
# Not few-bit-able: "linear" (identity: nothing to save), "prelu" and "xielu" (learned parameters: the
# derivative changes every step).
_UNSUPPORTED_ACT2FN = {
    "linear": "the identity saves nothing for backward",
    "prelu": "its slope is a learned parameter, so no fixed derivative table exists",
    "xielu": "its shape parameters are learned, so no fixed derivative table exists",
}


def spec_for_name(name: str) -> ActivationSpec:
    """The registry entry for a registry name or a transformers ``ACT2FN`` name (e.g. ``"gelu_new"``)."""
    if not isinstance(name, str):
        raise TypeError(f"activation name must be a str, got {type(name).__name__}")
    key = name.strip()
    if key in ACTIVATIONS:
        return ACTIVATIONS[key]
    if key in _BY_ACT2FN:
        return ACTIVATIONS[_BY_ACT2FN[key]]
    if key.lower() in ACTIVATIONS:
        return ACTIVATIONS[key.lower()]
    if key in _UNSUPPORTED_ACT2FN:
        raise ValueError(f"activation {name!r} is not supported: {_UNSUPPORTED_ACT2FN[key]}")
    valid = ", ".join(sorted(set(ACTIVATIONS) | set(_BY_ACT2FN)))
    raise ValueError(f"unknown activation {name!r}; known names: {valid}")


# --- module recognition ---------------------------------------------------------------------------------

# Exact types only: a user subclass may override forward, so it is not assumed to compute the same thing.
_TORCH_PARAMS: dict[type[nn.Module], tuple[str, tuple[str, ...]]] = {
    nn.ReLU: ("relu", ()),
    nn.ReLU6: ("relu6", ()),
    nn.LeakyReLU: ("leaky_relu", ("negative_slope",)),
    nn.Threshold: ("threshold", ("threshold", "value")),
    nn.Hardtanh: ("hardtanh", ("min_val", "max_val")),
    nn.Hardsigmoid: ("hardsigmoid", ()),
    nn.Hardswish: ("hardswish", ()),
    nn.Hardshrink: ("hardshrink", ("lambd",)),
    nn.Softshrink: ("softshrink", ("lambd",)),
    nn.Tanhshrink: ("tanhshrink", ()),
    nn.ELU: ("elu", ("alpha",)),
    nn.CELU: ("celu", ("alpha",)),
    nn.SELU: ("selu", ()),
    nn.SiLU: ("silu", ()),
    nn.Mish: ("mish", ()),
    nn.Sigmoid: ("sigmoid", ()),
    nn.LogSigmoid: ("logsigmoid", ()),
    nn.Tanh: ("tanh", ()),
    nn.Softplus: ("softplus", ("beta", "threshold")),
    nn.Softsign: ("softsign", ()),
}


def _hf_spec(module: nn.Module) -> tuple[ActivationSpec, dict[str, Any]] | None:
    cls = type(module)
    if not cls.__module__.startswith("transformers.activations"):
        return None
    name = cls.__name__
    if name == "GELUActivation":
        python = getattr(getattr(module, "act", None), "__name__", "") == "_gelu_python"
        return ACTIVATIONS["gelu_python" if python else "gelu"], {}
    if name in ("GELUTanh", "PytorchGELUTanh"):
        python = getattr(getattr(module, "act", None), "__name__", "") == "_gelu_tanh_python"
        return ACTIVATIONS["gelu_python_tanh" if python else "gelu_tanh"], {}
    if name == "ClippedGELUActivation":
        spec = ACTIVATIONS["clipped_gelu"]
        return spec, spec.params(min=float(module.min), max=float(module.max))
    if name == "MishActivation":
        # transformers keeps nn.functional.mish as self.act; the python fallback computes the same math.
        return ACTIVATIONS["mish"], {}
    for spec in _ENTRIES:
        if name in spec.hf_modules:
            return spec, spec.params()
    return None


def spec_for_module(module: nn.Module) -> tuple[ActivationSpec, dict[str, Any]] | None:
    """Recognise a torch.nn or transformers activation module: its registry entry and its parameters.

    Returns None for anything else (including subclasses of those classes, which may override forward).
    Parameters are read from the instance (e.g. ``LeakyReLU.negative_slope``, ``GELU.approximate``);
    ``inplace`` is ignored since it does not change the values.
    """
    cls = type(module)
    if cls is nn.GELU:
        approximate = getattr(module, "approximate", "none")
        if approximate == "none":
            return ACTIVATIONS["gelu"], {}
        if approximate == "tanh":
            return ACTIVATIONS["gelu_tanh"], {}
        raise ValueError(f"nn.GELU with approximate={approximate!r}: expected 'none' or 'tanh'")
    if cls in _TORCH_PARAMS:
        name, attrs = _TORCH_PARAMS[cls]
        spec = ACTIVATIONS[name]
        return spec, spec.params(**{a: getattr(module, a) for a in attrs})
    return _hf_spec(module)
