"""tightfit: train larger models and larger batches in the same accelerator memory.

The public names are imported lazily, so ``import tightfit`` stays cheap and optional dependencies
(transformers, matplotlib) are only imported by the features that need them.
"""

from __future__ import annotations

from tightfit._lazy import lazy_getattr
from tightfit._version import __version__

# name -> submodule that defines it (grouped by role, as in __all__ below)
_NAMES: dict[str, str] = {
    # the ruler
    "profile": "memory.profile",
    "estimate": "memory.profile",
    "MemoryReport": "memory.report",
    "parse_size": "sizes",
    "format_size": "sizes",
    # techniques: configuration and the one in-place verb
    "convert_": "convert",
    "ConversionReport": "convert",
    "FewBit": "fewbit.config",
    "Sketch": "sketch.config",
    "Offload": "offload.config",
    # the one-budget planner across techniques
    "plan": "planner",
    # rematerialization: through the remat package, which names its own defining modules
    "rematerialize": "remat",
    "RematConfig": "remat",
}
_SUBMODULES = (
    "memory",
    "fewbit",
    "sketch",
    "offload",
    "remat",
    "planner",
    "integrations",
    "zoo",
    "nn",
    "functional",
    "convert",
    "sizes",
)

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
    "Offload",
    "plan",
    "rematerialize",
    "RematConfig",
    # namespaces
    "memory",
    "fewbit",
    "sketch",
    "offload",
    "remat",
    "planner",
    "integrations",
    "zoo",
    "nn",
    "functional",
]


__getattr__ = lazy_getattr(__name__, _NAMES, submodules=_SUBMODULES)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
