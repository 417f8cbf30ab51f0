"""Module-scope conversions of one block (few-bit activations, sketched linears) as options of the chain DP.

A ``Variant`` is a conversion of the modules inside one block instance: few-bit activations with ``fewbit``
bits (``tightfit.FewBit``), linear layers keeping a sketch of ``sketch`` times their input rows
(``tightfit.Sketch``), or both. ``Combined(base, variant)`` is the way one block call runs under a plan:
the block converted by ``variant``, then run under the remat option ``base`` (store, here). Blocks are
distinct module instances, so ``convert_(model, config, filter_fn=within(path))`` converts one block and
its report's ``undo()`` puts it back: the planner measures a variant on a group's representative block,
and ``Plan.apply_`` converts exactly the blocks whose decision names a variant.

NOTE [ Sketch and the RNG ]
  A sketched layer draws its sketch seed from the global CPU generator by default, which would shift every
  dropout mask after it: the gradients of a sketched model would differ from the model's by the dropout
  noise as well as by the sketch. The planner gives each sketched layer a ``tightfit.sketch.LayerSeed``
  instead: its seed hashes a base drawn once per conversion (without consuming), the layer's index and a
  step count (a forward pre-hook on the root ticks it). Every dropout mask is the one the unconverted
  model draws, each step gets a fresh sketch, and a recompute of the layer (same step) draws the
  forward's sketch, so sketch and keep-ops combine. The seeding objects hold no module: a deep copy or a
  pickled model computes with its own weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from tightfit.convert import ConversionReport, convert_
from tightfit.fewbit.config import FewBit
from tightfit.remat.options import STORE, Option
from tightfit.sketch.config import Sketch
from tightfit.sketch.seeding import LayerSeed, StepClock

__all__ = ["Variant", "Combined", "within", "convert_blocks", "grad_sqnr"]


@dataclass(frozen=True)
class Variant:
    """A conversion of one block: few-bit activations inside it (``fewbit`` bits), sketched linear layers
    (``sketch``: the fraction of input rows kept), and/or what it saves offloaded to host memory
    (``offload``, on accelerators: ``tightfit.Offload`` restricted to this block)."""

    fewbit: int | None = None
    sketch: float | None = None
    offload: bool = False

    def __post_init__(self) -> None:
        if self.fewbit is None and self.sketch is None and not self.offload:
            raise ValueError("a Variant converts something: few-bit bits, a sketch ratio and/or offload")

    @property
    def key(self) -> str:
        parts = []
        if self.fewbit is not None:
            parts.append(f"fewbit{self.fewbit}")
        if self.sketch is not None:
            parts.append(f"sketch{self.sketch!r}")  # repr: parse gives the same float back
        if self.offload:
            parts.append("offload")
        return "+".join(parts)

    @property
    def techniques(self) -> tuple[str, ...]:
        named = (("fewbit", self.fewbit), ("sketch", self.sketch), ("offload", self.offload or None))
        return tuple(t for t, v in named if v is not None)

    @property
    def lossy(self) -> bool:
        return self.fewbit is not None or self.sketch is not None

    def configs(self) -> list[Any]:
        """The module-scope ``convert_`` configs, applied in this order (offload is applied last, to the
        block itself: ``convert_blocks``)."""
        out: list[Any] = []
        if self.fewbit is not None:
            out.append(FewBit(bits=self.fewbit))
        if self.sketch is not None:
            out.append(Sketch(ratio=self.sketch))
        return out

    @property
    def description(self) -> str:
        parts = []
        if self.fewbit is not None:
            parts.append(f"activations keep {self.fewbit}-bit codes of their input (few-bit backward)")
        if self.sketch is not None:
            parts.append(f"linear layers keep a sketch of {self.sketch:g} of their input rows")
        if self.offload:
            parts.append("what the block keeps moves to host memory and comes back for its backward")
        return "; ".join(parts)

    @classmethod
    def parse(cls, key: str) -> Variant:
        fewbit, sketch, offload = None, None, False
        for part in key.split("+"):
            if part.startswith("fewbit"):
                fewbit = int(part[len("fewbit") :])
            elif part.startswith("sketch"):
                sketch = float(part[len("sketch") :])
            elif part == "offload":
                offload = True
            else:
                raise ValueError(
                    f"malformed variant {key!r}: expected 'fewbit<b>', 'sketch<r>' or both with +"
                )
        return cls(fewbit, sketch, offload)


@dataclass(frozen=True)
class Combined(Option):
    """A block converted by ``variant``, run under the remat option ``base``."""

    base: Option
    variant: Variant

    @property
    def key(self) -> str:
        return self.variant.key if self.base == STORE else f"{self.variant.key}+{self.base.key}"

    @property
    def label(self) -> str:
        return self.variant.key if self.base == STORE else f"{self.variant.key}+{self.base.label}"

    @property
    def description(self) -> str:
        return f"{self.variant.description}; {self.base.description}"

    @property
    def checkpointed(self) -> bool:
        return self.base.checkpointed


def within(paths: Sequence[str]) -> Callable[[torch.nn.Module, str], bool]:
    """A ``convert_`` filter selecting the modules at or under any of ``paths``."""
    prefixes = tuple(p + "." for p in paths)
    exact = set(paths)

    def keep(_module: torch.nn.Module, path: str) -> bool:
        return path in exact or path.startswith(prefixes)

    return keep


class _Hook:
    """A root forward hook as a conversion report (``undo`` removes it) in ``convert_blocks``' list."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.undone = handle, False

    def undo(self) -> None:
        self.handle.remove()
        self.undone = True

    def __len__(self) -> int:
        return 0


def _seed_layers(model: torch.nn.Module, modules: Sequence[torch.nn.Module]) -> _Hook:
    """Give each sketched layer of one conversion a ``LayerSeed`` (a base drawn once, without consuming,
    from the global generator; the layer's index; a step clock ticked by a pre-hook on ``model``), so no
    layer draws from the global generator (NOTE [ Sketch and the RNG ]). Returns the hook's report."""
    with torch.random.fork_rng(devices=[]):
        base = int(torch.randint(0, 2**40, ()).item())
    clock = StepClock()
    for salt, module in enumerate(modules):
        module.seeding = LayerSeed(base, salt, clock)
    return _Hook(model.register_forward_pre_hook(clock))


def convert_blocks(
    model: torch.nn.Module, variant: Variant, paths: Sequence[str], offload_target: Any = None
) -> list[ConversionReport]:
    """Convert the blocks at ``paths`` with ``variant`` (their reports, to undo newest first); nothing is
    left converted when a conversion raises. ``offload_target``: the ``tightfit.offload`` target of an
    offload variant (None: the model's accelerator)."""
    reports: list[ConversionReport] = []
    try:
        for config in variant.configs():
            report = convert_(model, config, filter_fn=within(paths))
            reports.append(report)
            if isinstance(config, Sketch):
                modules = dict(model.named_modules())
                reports.append(_seed_layers(model, [modules[p] for p, _, _ in report.converted]))  # type: ignore[arg-type]
        if variant.offload:
            from tightfit.offload import Offload  # only where offload is planned (accelerators)

            # keep_last=0: every planned block offloads what it keeps; the plan, not a fixed rule, leaves
            # the last blocks on the device (their decision is then not an offload one)
            options = (
                {"blocks": list(paths)}
                if offload_target is None
                else {"blocks": list(paths), "target": offload_target}
            )
            reports.append(convert_(model, Offload(keep_last=0), **options))
    except BaseException:
        undo_all(reports)
        raise
    return reports


def undo_all(reports: Sequence[ConversionReport]) -> None:
    for report in reversed(reports):
        if not report.undone:
            report.undo()


@contextmanager
def converted(
    model: torch.nn.Module, by_variant: dict[Variant, list[str]], offload_target: Any = None
) -> Iterator[int]:
    """Blocks converted for the duration (``by_variant``: variant -> block paths); yields the number of
    modules converted."""
    reports: list[ConversionReport] = []
    try:
        for variant, paths in by_variant.items():
            if paths:
                reports += convert_blocks(model, variant, paths, offload_target)
        yield sum(len(r) for r in reports)
    finally:
        undo_all(reports)


def grad_sqnr(reference: Sequence[torch.Tensor | None], grads: Sequence[torch.Tensor | None]) -> float:
    """SQNR in dB of ``grads`` against ``reference`` (all tensors together: 10 log10 of the reference's
    energy over the error's); inf when equal, -inf when a gradient is missing on one side only."""
    signal = noise = 0.0
    for r, g in zip(reference, grads, strict=True):
        if r is None and g is None:
            continue
        if r is None or g is None:
            return -math.inf
        r64, g64 = r.detach().double(), g.detach().double()
        signal += float((r64 * r64).sum())
        noise += float(((r64 - g64) ** 2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
