"""Drop-in modules with torch.nn's signatures: few-bit activations (``GELU(bits=2)``, ...) and
``RandomizedLinear``. Names are resolved lazily from the technique packages that define them."""

from __future__ import annotations

import importlib
from typing import Any

_PROVIDERS = ("tightfit.fewbit.modules", "tightfit.sketch.modules")


def _lookup(name: str) -> Any:
    for provider in _PROVIDERS:
        module = importlib.import_module(provider)
        if name in getattr(module, "__all__", ()):
            return getattr(module, name)
    raise AttributeError(f"module 'tightfit.nn' has no attribute {name!r}")


def __getattr__(name: str) -> Any:
    value = _lookup(name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    names: set[str] = set(globals())
    for provider in _PROVIDERS:
        names |= set(getattr(importlib.import_module(provider), "__all__", ()))
    return sorted(names)
