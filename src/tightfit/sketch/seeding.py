"""Sketch seeds that leave the global RNG as it is: ``LayerSeed``, an option of the randomized modules.

By default a randomized layer draws its sketch seed from the global CPU generator (``draw_seed``), which
shifts every random number drawn after it (dropout masks): a sketched model's gradients then differ from
the model's by the dropout noise as well as by the sketch. A module whose ``seeding`` is a ``LayerSeed``
draws nothing: its seed is a hash of

  base   an integer fixed when the seeding is made (one per conversion),
  salt   the layer's index in that conversion (layers get different sketches),
  step   a ``StepClock``'s count: a forward pre-hook on the model's root ticks it once per forward, so
         every training step draws a fresh sketch, whether or not the model draws random numbers. A
         loop that never calls that root (Lightning calls ``training_step``) ticks it with ``tick``.

NOTE (compile): the count is a 0-dim int64 CPU tensor ticked in place, and the hash is a custom op reading
it (``tightfit::layer_seed``). ``torch.compile`` traces the hook's ``add_`` as a mutation of a graph input
and keeps the op opaque, so a compiled model ticks and reads the count at run time and draws the sketches
the eager model draws, step for step, without a graph break. A Python int would be traced as a constant:
the compiled model would draw one sketch for every step.

A recompute of the layer (``torch.utils.checkpoint``, in the backward of the same step) sees the same
step, so it draws the same sketch: the recomputed forward is the forward, whichever ops a selective
checkpoint keeps (a kept dropout does not draw again in the recompute, so nothing read from the global
generator's state could be relied on). The sketches depend on the global generator only through
``base``, drawn when the seeding is made. Calls of one layer within one step draw the same sketch (each
estimate stays unbiased; they are correlated, as layers sharing a sketch are).

Both classes are plain picklable objects holding no module: ``copy.deepcopy`` and ``torch.save`` of a
model carry them along (the clock shared by the copy's layers and its root hook), and a copy computes
with its own weights.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import torch
from torch import Tensor

__all__ = ["LayerSeed", "StepClock", "tick"]


class StepClock:
    """A training-step counter; registered as a forward pre-hook on the model's root, it ticks once per
    forward of the model (compiled or not: NOTE (compile))."""

    def __init__(self) -> None:
        with torch.inference_mode(False):  # made under inference mode, it could not be ticked outside it
            self.count = torch.zeros((), dtype=torch.int64)

    @property
    def step(self) -> int:
        return int(self.count)

    def __call__(self, _module: torch.nn.Module | None = None, _args: Any = None) -> None:
        self.count.add_(1)


@torch.library.custom_op("tightfit::layer_seed", mutates_args=())
def _layer_seed(step: Tensor, base: int, salt: int) -> Tensor:
    """The seed of (``base``, ``salt``, ``step``) as a 0-dim int64 tensor (a 62-bit int)."""
    h = hashlib.blake2b(struct.pack("<qqq", base, salt, int(step)), digest_size=8)
    return torch.tensor(int.from_bytes(h.digest(), "little") % 2**62, dtype=torch.int64)


@_layer_seed.register_fake
def _(step, base, salt):  # noqa: ANN001, ANN202
    return torch.empty((), dtype=torch.int64)


class LayerSeed:
    """The sketch seed of one layer from (``base``, ``salt``, the ``clock``'s step), consuming no random
    number (see the module docstring)."""

    def __init__(self, base: int, salt: int, clock: StepClock | None = None) -> None:
        if (
            isinstance(base, bool)
            or not isinstance(base, int)
            or isinstance(salt, bool)
            or not isinstance(salt, int)
        ):
            raise TypeError(f"LayerSeed takes integers base and salt, got {base!r}, {salt!r}")
        self.base, self.salt, self.clock = base, salt, clock

    def draw(self) -> Tensor:
        """This call's seed (a 0-dim int64 tensor holding a 62-bit int)."""
        step = self.clock.count if self.clock is not None else torch.zeros((), dtype=torch.int64)
        return _layer_seed(step, self.base % 2**63, self.salt)

    def __repr__(self) -> str:
        return f"LayerSeed(base={self.base}, salt={self.salt}, step={self.clock.step if self.clock else 0})"


def tick(model: torch.nn.Module) -> int:
    """Tick once every ``StepClock`` the sketched layers of ``model`` draw their seeds from, for a loop that
    runs the layers without calling the root the clock's hook is on; returns how many clocks ticked."""
    clocks: dict[int, StepClock] = {}
    for module in model.modules():
        seeding = getattr(module, "seeding", None)
        if isinstance(seeding, LayerSeed) and seeding.clock is not None:
            clocks[id(seeding.clock)] = seeding.clock
    for clock in clocks.values():
        clock()
    return len(clocks)
