"""Drop-in modules with torch.nn's signatures: few-bit activations (``GELU(bits=2)``, ...) and
``RandomizedLinear``. Names are resolved lazily from the technique packages that define them."""

from __future__ import annotations

import importlib

from tightfit._lazy import provider_getattr

_PROVIDERS = ("tightfit.fewbit.modules", "tightfit.sketch.modules")
__getattr__ = provider_getattr(__name__, _PROVIDERS)


def __dir__() -> list[str]:
    names: set[str] = set(globals())
    for provider in _PROVIDERS:
        names |= set(getattr(importlib.import_module(provider), "__all__", ()))
    return sorted(names)
