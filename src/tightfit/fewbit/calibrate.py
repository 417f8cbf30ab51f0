"""Record each activation's pre-activation distribution on real batches, to fit tables to it.

``calibrate(model, batches)`` hooks every module :func:`spec_for_module` recognises, runs the batches
(``tightfit._step`` convention: tensor / tuple / dict) and keeps, per module path, a fixed-size histogram
of its inputs: 4096 linear bins on [-16, 16] plus geometric tails (8 bins per octave out to ±16·2^20)
plus under/overflow, min and max. Memory per module is O(bins), whatever the number of batches.
``calibration.weight(path)`` is a :class:`~tightfit.fewbit.fit.HistogramWeight` for
``fit(..., weight=...)``; ``calibration.fit(path, bits)`` does both.

With a ``loss_fn`` (or ``backward=True``), each batch is also backpropagated (``torch.autograd.grad``
to the activation outputs only: parameters' ``.grad`` are not touched) and the squared output gradient
is summed per input bin: ``weight(path, by="grad")`` is then p(x)·E[g² | x], the weight under which the
table's error is exactly the expected squared error of the input gradient it produces.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._step import call_model, loss_of
from .activations import ActivationSpec, spec_for_module, spec_for_name
from .fit import HistogramWeight, fit
from .tables import Table, exact_table

__all__ = ["Calibration", "Histogram", "calibrate"]


def _edges(core: float, bins: int, octaves: int = 20, per_octave: int = 8) -> np.ndarray:
    lin = np.linspace(-core, core, bins + 1)
    tail = core * 2.0 ** (np.arange(1, octaves * per_octave + 1) / per_octave)
    return np.concatenate([-tail[::-1], lin, tail])


@dataclass
class Histogram:
    """Counts of values per bin of ``edges`` (index 0: <= edges[0], last: > edges[-1]), plus the sum of
    squared output gradients per bin when recorded."""

    edges: np.ndarray
    counts: np.ndarray = field(default=None)  # type: ignore[assignment]
    grad_sq: np.ndarray | None = None
    nonfinite: int = 0
    min: float = math.inf
    max: float = -math.inf

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = np.zeros(self.edges.size + 1)
        self._edges_t = torch.from_numpy(self.edges).float()

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def bin_index(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(bin index per finite element, finite mask), x flattened and widened to float32."""
        v = x.detach().reshape(-1)
        v = v.float() if v.dtype != torch.float64 else v
        finite = torch.isfinite(v)
        idx = torch.bucketize(v, self._edges_t.to(device=v.device, dtype=v.dtype), right=False)
        return idx, finite

    def add(self, x: Tensor) -> tuple[Tensor, Tensor]:
        idx, finite = self.bin_index(x)
        nf = int((~finite).sum())
        self.nonfinite += nf
        good = idx[finite] if nf else idx
        self.counts += torch.bincount(good, minlength=self.counts.size).cpu().double().numpy()
        if good.numel():
            vals = x.detach().reshape(-1)[finite] if nf else x.detach().reshape(-1)
            self.min = min(self.min, float(vals.min()))
            self.max = max(self.max, float(vals.max()))
        return idx, finite

    def add_grad(self, idx: Tensor, finite: Tensor, g: Tensor) -> None:
        if self.grad_sq is None:
            self.grad_sq = np.zeros(self.counts.size)
        g2 = g.detach().reshape(-1).double() ** 2
        add = torch.bincount(idx[finite], weights=g2[finite], minlength=self.counts.size)
        self.grad_sq += add.cpu().numpy()

    def weight(self, by: str = "input") -> HistogramWeight:
        """The recorded density (by="input"), or density × E[g²|x] (by="grad"), as a fit weight."""
        if self.total == 0:
            raise ValueError("no finite values were recorded for this module")
        if by == "input":
            mass = self.counts
        elif by == "grad":
            if self.grad_sq is None:
                raise ValueError("no gradients recorded: calibrate with a loss_fn or backward=True")
            mass = self.grad_sq
        else:
            raise ValueError(f"by must be 'input' or 'grad', got {by!r}")
        # Under/overflow bins reach to the recorded min/max; inner bins are the fixed edges.
        lo = min(self.min, self.edges[0])
        hi = max(self.max, self.edges[-1])
        edges = np.concatenate([[lo], self.edges, [hi]])
        m = mass.copy()
        keep = np.diff(edges) > 0
        if not keep.all():  # min == edges[0] or max == edges[-1]: the empty outer bin goes
            edges = np.concatenate([edges[:1], edges[1:][keep]])
            m = m[keep]
        # clip the outermost non-empty bins to the observed range so no mass lies outside it
        nz = np.flatnonzero(m)
        if nz.size == 0:
            raise ValueError("the recorded weight is zero everywhere")
        e = edges.copy()
        if self.min < e[nz[0] + 1]:
            e[nz[0]] = max(e[nz[0]], self.min)
        if self.max > e[nz[-1]]:
            e[nz[-1] + 1] = min(e[nz[-1] + 1], self.max)
        return HistogramWeight(e, m)


@dataclass
class Calibration:
    """Per-module-path histograms of pre-activations, with the registry entry of each module."""

    histograms: dict[str, Histogram]
    specs: dict[str, tuple[ActivationSpec, dict[str, Any]]]
    batches: int = 0

    @property
    def paths(self) -> list[str]:
        return list(self.histograms)

    def _get(self, path: str) -> Histogram:
        if path not in self.histograms:
            raise KeyError(f"no calibrated activation at {path!r}; calibrated paths: {self.paths}")
        return self.histograms[path]

    def weight(self, path: str, by: str = "input") -> HistogramWeight:
        """The fit weight of the activation at ``path`` (see :meth:`Histogram.weight`)."""
        return self._get(path).weight(by)

    def fit(self, path: str, bits: int, by: str = "input", **kw: Any) -> Table:
        """The optimal table for the module at ``path`` under its recorded distribution."""
        spec, params = self.specs[path] if path in self.specs else (None, None)
        self._get(path)
        if spec.kind != "smooth":
            return exact_table(spec.name, **params)
        return fit(spec, bits, weight=self.weight(path, by), params=params, **kw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per path the registry name, parameters and histogram (save and reuse)."""
        mods = {}
        for p, h in self.histograms.items():
            spec, params = self.specs[p]
            mods[p] = {
                "fn": spec.name, "params": dict(params), "edges": h.edges.tolist(),
                "counts": h.counts.tolist(),
                "grad_sq": None if h.grad_sq is None else h.grad_sq.tolist(),
                "nonfinite": h.nonfinite, "min": h.min, "max": h.max,
            }
        return {"format": 1, "batches": self.batches, "modules": mods}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        hist, specs = {}, {}
        for p, m in d["modules"].items():
            spec = spec_for_name(m["fn"])
            specs[p] = (spec, spec.params(**m["params"]))
            hist[p] = Histogram(
                np.asarray(m["edges"], dtype=np.float64), np.asarray(m["counts"], dtype=np.float64),
                None if m["grad_sq"] is None else np.asarray(m["grad_sq"], dtype=np.float64),
                int(m["nonfinite"]), float(m["min"]), float(m["max"]),
            )
        return cls(hist, specs, int(d.get("batches", 0)))

    def summary(self) -> str:
        lines = [f"{'path':<40}{'fn':<14}{'count':>12}{'min':>10}{'max':>10}"]
        for p, h in self.histograms.items():
            lines.append(f"{p:<40}{self.specs[p][0].name:<14}{h.total:>12.0f}{h.min:>10.3g}{h.max:>10.3g}")
        return "\n".join(lines)


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any], Tensor] | None = None,
    *,
    backward: bool | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    core: float = 16.0,
    bins: int = 4096,
) -> Calibration:
    """Record the input distribution of every recognised activation module of ``model`` over ``batches``.

    ``backward`` defaults to ``loss_fn is not None``; the loss follows ``tightfit._step.loss_of``.
    ``filter_fn(module, path)`` restricts the modules. The model's mode and parameters are untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (core > 0 and math.isfinite(core)) or int(bins) < 2:
        raise ValueError(f"need core > 0 and bins >= 2, got core={core}, bins={bins}")
    do_backward = (loss_fn is not None) if backward is None else bool(backward)
    edges = _edges(float(core), int(bins))
    hist: dict[str, Histogram] = {}
    specs: dict[str, tuple[ActivationSpec, dict[str, Any]]] = {}
    pending: list[tuple[str, Tensor, Tensor, Tensor]] = []
    handles = []

    def hook(path: str):
        def fn(module: nn.Module, args: tuple, output: Any) -> None:
            if not args or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
                return
            idx, finite = hist[path].add(args[0])
            if do_backward and isinstance(output, Tensor) and output.requires_grad:
                pending.append((path, idx, finite, output))

        return fn

    for path, m in model.named_modules():
        found = spec_for_module(m)
        if found is None or (filter_fn is not None and not filter_fn(m, path)):
            continue
        specs[path] = found
        hist[path] = Histogram(edges)
        handles.append(m.register_forward_hook(hook(path)))
    if not hist:
        raise ValueError("the model has no activation module tightfit recognises (see spec_for_module)")
    n = 0
    try:
        for batch in batches:
            n += 1
            pending.clear()
            if do_backward:
                with torch.enable_grad():
                    out = call_model(model, batch)
                    loss = loss_of(out, loss_fn)
                    outs = [p[3] for p in pending]
                    grads = torch.autograd.grad(loss, outs, allow_unused=True) if outs else []
                for (path, idx, finite, _), g in zip(pending, grads):
                    if g is not None:
                        hist[path].add_grad(idx, finite, g)
            else:
                with torch.no_grad():
                    call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
        pending.clear()
    if n == 0:
        raise ValueError("no batches given")
    return Calibration(hist, specs, n)
