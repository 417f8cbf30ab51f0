"""Functional forms of the drop-ins (``gelu(x, bits=2)``, ``randomized_linear(...)``), resolved lazily."""

from __future__ import annotations

import importlib
from typing import Any

_PROVIDERS = ("tightfit.fewbit.functional", "tightfit.sketch.functional")


def __getattr__(name: str) -> Any:
    for provider in _PROVIDERS:
        module = importlib.import_module(provider)
        if name in getattr(module, "__all__", ()):
            value = getattr(module, name)
            globals()[name] = value
            return value
    raise AttributeError(f"module 'tightfit.functional' has no attribute {name!r}")
