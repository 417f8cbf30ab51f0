"""Functional forms of the drop-ins (``gelu(x, bits=2)``, ``randomized_linear(...)``), resolved lazily."""

from __future__ import annotations

from tightfit._lazy import provider_getattr

__getattr__ = provider_getattr(__name__, ("tightfit.fewbit.functional", "tightfit.sketch.functional"))
