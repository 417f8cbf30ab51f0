"""tightfit: train larger models and larger batches in the same accelerator memory.

The public names are imported lazily, so ``import tightfit`` stays cheap and optional dependencies
(transformers, matplotlib) are only imported by the features that need them.
"""

from __future__ import annotations

import importlib
from typing import Any

from tightfit._version import __version__

# name -> module that defines it (grouped by role, as in __all__ below)
_LAZY: dict[str, str] = {
    # the ruler
    "profile": "tightfit.memory.profile",
    "estimate": "tightfit.memory.profile",
    "MemoryReport": "tightfit.memory.report",
    "parse_size": "tightfit.sizes",
    "format_size": "tightfit.sizes",
    # techniques: configuration and the one in-place verb
    "convert_": "tightfit.convert",
    "ConversionReport": "tightfit.convert",
    "FewBit": "tightfit.fewbit.config",
    "Sketch": "tightfit.sketch.config",
    # rematerialization
    "rematerialize": "tightfit.remat.auto",
}
_SUBMODULES = ("memory", "fewbit", "sketch", "remat", "zoo", "nn", "functional", "convert", "sizes")

__all__ = [
    "__version__",
    # the ruler
    "profile",
    "estimate",
    "MemoryReport",
    "parse_size",
    "format_size",
    # techniques
    "convert_",
    "ConversionReport",
    "FewBit",
    "Sketch",
    "rematerialize",
    # namespaces
    "memory",
    "fewbit",
    "sketch",
    "remat",
    "zoo",
    "nn",
    "functional",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"tightfit.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'tightfit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
