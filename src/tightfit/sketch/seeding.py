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

__all__ = ["LayerSeed", "StepClock", "tick"]


class StepClock:
    """A training-step counter; registered as a forward pre-hook on the model's root, it ticks once per
    forward of the model."""

    def __init__(self) -> None:
        self.step = 0

    def __call__(self, _module: torch.nn.Module, _args: Any) -> None:
        if not torch.compiler.is_compiling():
            self.step += 1


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

    def draw(self) -> int:
        """This call's seed (a 62-bit int)."""
        step = self.clock.step if self.clock is not None else 0
        h = hashlib.blake2b(struct.pack("<qqq", self.base % 2**63, self.salt, step), digest_size=8)
        return int.from_bytes(h.digest(), "little") % 2**62

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
        clock.step += 1
    return len(clocks)
