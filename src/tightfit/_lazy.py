"""Lazy attribute tables for package ``__init__`` files: names resolve to their defining module on first use,
so importing a package does not import every submodule (or torch.library registrations) up front.

A name looked up this way is not an import edge of the package: the layering test
(tests/test_layering.py) reads only import statements.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any


def lazy_getattr(
    package: str, names: dict[str, str], *, submodules: Iterable[str] = ()
) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` resolving ``names[name]`` (a submodule of `package`) on demand.

    ``names`` maps an attribute to the submodule (relative to `package`) that defines it; ``submodules``
    lists submodules that are themselves attributes (``tightfit.memory`` as ``tightfit``'s ``memory``).
    """
    modules = frozenset(submodules)

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        elif name in modules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        importlib.import_module(package).__dict__[name] = value
        return value

    return __getattr__


def provider_getattr(package: str, providers: tuple[str, ...]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` resolving any name in the ``__all__`` of one of `providers`."""

    def __getattr__(name: str) -> Any:
        for provider in providers:
            module = importlib.import_module(provider)
            if name in getattr(module, "__all__", ()):
                value = getattr(module, name)
                importlib.import_module(package).__dict__[name] = value
                return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
