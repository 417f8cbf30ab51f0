"""`convert_`: one in-place verb that applies a technique's config to any model (torchao's `quantize_` style).

Each technique registers a handler for its config type with `register_converter`. A handler must check
everything it will change *before* changing anything, so a failed conversion leaves the model untouched,
and must return a `ConversionReport` that lists every converted and every skipped module with a reason.
Parameters are shared with the original modules, so state_dict keys and values stay the same.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

FilterFn = Callable[[torch.nn.Module, str], bool]
Handler = Callable[..., "ConversionReport"]  # (model, config, filter_fn, **options)

_HANDLERS: dict[type, Handler] = {}
# Modules that register handlers; imported on the first call so `import tightfit` stays light.
_HANDLER_MODULES = ("tightfit.fewbit.convert", "tightfit.sketch.convert")


@dataclass
class ConversionReport:
    """What `convert_` did: converted modules (path, before, after), skipped ones with reasons, notes,
    and numbers a technique measured or predicted (e.g. saved bytes, peak before/after) in `metrics`."""

    technique: str
    converted: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.converted)

    def __str__(self) -> str:
        lines = [f"{self.technique}: converted {len(self.converted)} module(s), skipped {len(self.skipped)}"]
        lines += [f"  {path or '<root>'}: {before} -> {after}" for path, before, after in self.converted]
        lines += [f"  skipped {path or '<root>'}: {why}" for path, why in self.skipped]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def register_converter(config_type: type) -> Callable[[Handler], Handler]:
    """Decorator: register `handler(model, config, filter_fn, **options) -> ConversionReport`."""

    def decorate(handler: Handler) -> Handler:
        _HANDLERS[config_type] = handler
        return handler

    return decorate


def replace_module(root: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    """Replace the submodule at dotted `path` (as in named_modules()) with `new`."""
    if not path:
        raise ValueError("cannot replace the root module in place; convert its children instead")
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def convert_(
    model: torch.nn.Module,
    config: Any,
    filter_fn: FilterFn | None = None,
    *,
    verbose: bool = True,
    **options: Any,
) -> ConversionReport:
    """Convert `model` in place with `config` (e.g. `tightfit.FewBit(bits=2)`, `tightfit.Sketch(ratio=0.2)`).

    `filter_fn(module, path) -> bool` limits which modules are considered. `options` go to the technique's
    handler, e.g. ``example=batch`` for `Sketch` (finds inputs that other ops keep alive anyway and
    measures the real peak change). Prints the report unless `verbose=False`, and returns it.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert_ expects a torch.nn.Module, got {type(model).__name__}")
    for name in _HANDLER_MODULES:
        importlib.import_module(name)
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(sorted(t.__name__ for t in _HANDLERS)) or "none registered"
        raise TypeError(f"convert_ got a config of type {type(config).__name__}; valid configs: {known}")
    report = handler(model, config, filter_fn, **options)
    if verbose:
        print(report)
    return report
