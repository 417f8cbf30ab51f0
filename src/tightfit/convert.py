"""`convert_`: one in-place verb that applies a technique's config to any model (torchao's `quantize_` style).

Each technique registers a handler for its config type with `register_converter`. A handler must check
everything it will change *before* changing anything, swap modules only through `replace_module`, and
return a `ConversionReport` that lists every converted and every skipped module with a reason.
Parameters are shared with the original modules, so state_dict keys and values stay the same.

NOTE [ Undo ]: while a handler runs, `convert_` records every `replace_module` call (parent module,
attribute name, the module taken out, the module put in) and every other edit the handler records with
`record_edit` (few-bit swaps plain function attributes and instance forwards). That record serves two
purposes:

- if the handler raises, the replacements it already made are put back in reverse order before the
  exception propagates, so a failed conversion never leaves a model half-converted;
- `ConversionReport.undo()` puts the original module objects back, which restores the model's module
  types, state_dict and outputs exactly (the parameters were shared, never copied).

`undo()` first checks, for every replacement, that the converted module is still where the conversion put
it and still holds the submodules and tensors it shared with the original; if not (say a later conversion
replaced one of them and has not been undone), it raises without touching the model. A converted module
starts in the train/eval mode of the one it replaces, and undo hands its mode back, so a train()/eval()
switch made while converted carries over. Hooks registered on converted
modules are not carried over (they belong to those modules).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, TypeVar

import torch

__all__ = [
    "ConversionReport",
    "Edit",
    "FilterFn",
    "config_from_dict",
    "convert_",
    "record_edit",
    "register_converter",
    "replace_module",
]

FilterFn = Callable[[torch.nn.Module, str], bool]
Handler = Callable[..., "ConversionReport"]  # (model, config, filter_fn, **options)

_HANDLERS: dict[type, Handler] = {}
# Modules that register handlers; imported on the first call so `import tightfit` stays light.
_HANDLER_MODULES = ("tightfit.fewbit.convert", "tightfit.sketch.convert", "tightfit.offload.convert")


@dataclass(frozen=True, eq=False)
class _Replacement:
    """One `replace_module` call: ``parent.<name>`` went from ``old`` to ``new``."""

    root: torch.nn.Module
    parent_path: str
    parent: torch.nn.Module
    name: str
    old: torch.nn.Module
    new: torch.nn.Module
    shared: tuple[tuple[str, Any], ...]  # submodules and tensors of `old` that `new` holds by the same name

    @property
    def path(self) -> str:
        return f"{self.parent_path}.{self.name}" if self.parent_path else self.name

    def put_back(self) -> None:
        self.old.training = self.new.training  # a train()/eval() made while converted carries over
        setattr(self.parent, self.name, self.old)


class Edit(Protocol):
    """A change a handler made to a model other than a `replace_module` call (a plain attribute swapped,
    an instance ``forward`` set), recorded with `record_edit` so that `convert_` and `undo` reverse it."""

    path: str

    def in_place(self) -> bool:
        """Whether the model still holds what the edit put there."""
        ...

    def put_back(self) -> None:
        """Reverse the edit."""
        ...


class _Journal:
    """The replacements and edits of one `convert_` call, in the order they were made."""

    def __init__(self) -> None:
        self.entries: list[_Replacement | Edit] = []
        self.undone = False

    def rollback(self) -> None:
        """Put every original back, newest first, without checks (used when the handler raised)."""
        for r in reversed(self.entries):
            if isinstance(r, _Replacement):
                setattr(r.parent, r.name, r.old)
            else:
                r.put_back()
        self.entries = []

    def problems(self) -> list[str]:
        """Why `undo` cannot restore the model exactly (empty when it can)."""
        found: list[str] = []
        current: dict[tuple[int, str], torch.nn.Module | None] = {}  # (parent, name) after earlier undos
        for r in reversed(self.entries):
            if not isinstance(r, _Replacement):
                if not r.in_place():
                    found.append(
                        f"{r.path} was changed after the conversion (a plan applied on top? undo it first)"
                    )
                continue
            key = (id(r.parent), r.name)
            here = current[key] if key in current else r.parent._modules.get(r.name)
            if here is not r.new:
                held = "nothing" if here is None else type(here).__name__
                found.append(f"{r.path} holds {held}, not the {type(r.new).__name__} converting put there")
            elif key not in current and _lookup(r.root, r.parent_path) is not r.parent:
                found.append(f"{r.parent_path or '<root>'} is no longer the module that held {r.path}")
            else:
                parts = _named_parts(r.new)
                for name, part in r.shared:
                    if parts.get(name) is not part:
                        found.append(
                            f"{r.path}.{name} was replaced after the conversion (by a later conversion? "
                            "undo that one first); undo would bring back what it replaced"
                        )
            current[key] = r.old
        return found

    def undo(self) -> None:
        """Check every replacement (`problems`), then put the originals back newest first."""
        if self.undone:
            raise RuntimeError("this conversion was already undone; convert the model again to redo it")
        found = self.problems()
        if found:
            raise RuntimeError(
                "cannot undo the conversion: the model changed in a way undo cannot reverse; nothing was "
                "changed:\n  " + "\n  ".join(found)
            )
        for r in reversed(self.entries):
            r.put_back()
        self.entries = []  # let the converted modules go
        self.undone = True


# The journal of the `convert_` call in progress (handlers swap modules; they do not call `convert_`).
_ACTIVE: contextvars.ContextVar[_Journal | None] = contextvars.ContextVar("_ACTIVE", default=None)


@contextlib.contextmanager
def _recording(journal: _Journal) -> Iterator[None]:
    token = _ACTIVE.set(journal)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _lookup(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _named_parts(module: torch.nn.Module) -> dict[str, Any]:
    """Submodules, parameters and buffers of `module` by dotted name (the names never collide)."""
    out: dict[str, Any] = {n: m for n, m in module.named_modules(remove_duplicate=False) if n}
    out.update(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


@dataclass
class ConversionReport:
    """What `convert_` did: converted modules (path, before, after), skipped ones with reasons, notes,
    and numbers a technique measured or predicted (e.g. saved bytes, peak before/after) in `metrics`.

    `undo()` reverses the conversion (see the NOTE [ Undo ] in `tightfit.convert`).
    """

    technique: str
    converted: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    _journal: _Journal | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.converted)

    def __str__(self) -> str:
        lines = [f"{self.technique}: converted {len(self.converted)} module(s), skipped {len(self.skipped)}"]
        lines += [f"  {path or '<root>'}: {before} -> {after}" for path, before, after in self.converted]
        lines += [f"  skipped {path or '<root>'}: {why}" for path, why in self.skipped]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    @property
    def undone(self) -> bool:
        """Whether `undo()` has put the original modules back."""
        return self._journal is not None and self._journal.undone

    def undo(self) -> None:
        """Put back the original module objects this conversion replaced, newest first.

        Afterwards the model has its original module types, state_dict (the same tensors: they were shared)
        and outputs. Raises RuntimeError, changing nothing, when called twice or when the model changed
        in a way that undo cannot reverse (a converted module was replaced or moved, or a submodule or
        tensor it shared with its original was replaced); the error lists every such change. Undo
        several conversions of one model newest first.
        """
        if self._journal is None:
            raise RuntimeError(
                "this report was not returned by tightfit.convert_, so it has no conversion to undo"
            )
        self._journal.undo()


_Config = TypeVar("_Config")


def config_from_dict(cls: type[_Config], data: dict[str, Any], technique: str) -> _Config:
    """The dataclass config ``cls`` rebuilt from its ``to_dict`` (``{"technique": technique, field: value,
    ...}``; the tag may be absent); ValueError when the tag names another technique or a key is not one of
    ``cls``'s fields (listing the valid ones)."""
    data = dict(data)
    tag = data.pop("technique", technique)
    name = cls.__name__
    if tag != technique:
        article = "an" if name[0] in "AEIOU" else "a"
        raise ValueError(f"not {article} {name} config: technique={tag!r}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {name} fields {unknown}; valid: {sorted(known)}")
    return cls(**data)


def register_converter(config_type: type) -> Callable[[Handler], Handler]:
    """Decorator: register `handler(model, config, filter_fn, **options) -> ConversionReport`."""

    def decorate(handler: Handler) -> Handler:
        _HANDLERS[config_type] = handler
        return handler

    return decorate


def record_edit(edit: Edit) -> None:
    """Record ``edit``, already made by the running handler, in the `convert_` call's journal: put back if
    the handler raises later, and by the report's `undo` (checked with ``in_place`` first), newest first
    among every replacement and edit. Outside a `convert_` call nothing is recorded."""
    journal = _ACTIVE.get()
    if journal is not None:
        journal.entries.append(edit)


def replace_module(root: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    """Replace the existing submodule at dotted `path` (as in named_modules()) with `new`, which takes the
    train/eval mode of the module it replaces (its own flag only: shared children keep theirs).

    Inside `convert_` the replacement is recorded, so it is reversed if the handler fails and by
    `ConversionReport.undo()`.
    """
    if not path:
        raise ValueError("cannot replace the root module in place; convert its children instead")
    if not isinstance(new, torch.nn.Module):
        raise TypeError(f"replace_module puts a torch.nn.Module at {path!r}, got {type(new).__name__}")
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = parent._modules.get(name)
    if old is None:
        raise ValueError(
            f"{path!r} is not a submodule of {type(root).__name__}; replace_module replaces an existing one "
            "(see named_modules())"
        )
    journal = _ACTIVE.get()
    if journal is not None:
        parts = _named_parts(new)
        shared = tuple((n, part) for n, part in _named_parts(old).items() if parts.get(n) is part)
        journal.entries.append(_Replacement(root, parent_path, parent, name, old, new, shared))
    new.training = old.training
    setattr(parent, name, new)


def _check_options(handler: Handler, config: Any, options: dict[str, Any]) -> None:
    """Raise a TypeError naming the options `handler` does not take, and the ones it does."""
    params = inspect.signature(handler).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in list(params.items())[3:] if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"convert_ with {type(config).__name__} got unknown option(s) {unknown}; "
            f"valid: {valid or 'none'}"
        )


def convert_(
    model: torch.nn.Module,
    config: Any,
    filter_fn: FilterFn | None = None,
    *,
    verbose: bool = False,
    **options: Any,
) -> ConversionReport:
    """Convert `model` in place with `config` (e.g. `tightfit.FewBit(bits=2)`, `tightfit.Sketch(ratio=0.2)`).

    `filter_fn(module, path) -> bool` limits which modules are considered. `options` go to the technique's
    handler, e.g. ``example=batch`` for `Sketch` (finds inputs that other ops keep alive anyway and
    measures the real peak change; ``loss_fn=`` and ``measure=`` go with it). Returns the report, and
    prints it when `verbose` is true. ``report.undo()`` restores the original modules. If the conversion
    fails, every module it already replaced is put back before the error propagates.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert_ expects a torch.nn.Module, got {type(model).__name__}")
    for name in _HANDLER_MODULES:
        importlib.import_module(name)
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(sorted(t.__name__ for t in _HANDLERS)) or "none registered"
        raise TypeError(f"convert_ got a config of type {type(config).__name__}; valid configs: {known}")
    _check_options(handler, config, options)
    journal = _Journal()
    try:
        with _recording(journal):
            report = handler(model, config, filter_fn, **options)
        if not isinstance(report, ConversionReport):
            raise TypeError(
                f"the convert_ handler for {type(config).__name__} returned {type(report).__name__}, "
                "not a ConversionReport"
            )
    except BaseException:
        journal.rollback()
        raise
    report._journal = journal
    if verbose:
        print(report)
    return report
