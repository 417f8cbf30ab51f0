"""`tightfit.convert_(model, FewBit(...))`: swap every recognised activation for its few-bit version.

What is converted (after ``filter_fn(module, path)`` and the config's include/exclude):

- torch.nn activation modules of the registry (exact types: a subclass may override forward);
- transformers' ``ACT2FN`` activation modules (``GELUActivation``, ``NewGELUActivation``, ...);
- with ``FewBit(gated=True)``, gated MLPs whose forward is exactly
  ``self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))`` (LlamaMLP, MistralMLP, Qwen2MLP,
  ... checked on the forward's source, not the class name) become a `FewBitGatedMLP` holding the same
  submodules.

Everything is planned and validated (tables built, unsupported modules found) before the model is
touched; with ``on_unsupported="error"`` an unsupported activation raises and nothing changes. A module
shared between several parents is replaced at every path by one new module.

Two more places activations hide, both handled after the module swaps (and undone by ``report.undo()``):

- function attributes: a module holding an activation *function* as a public instance attribute, as
  torch's ``nn.TransformerEncoderLayer(activation="gelu")`` holds ``self.activation = F.gelu``, gets the
  few-bit module in that attribute (``F.gelu``, ``F.silu``, ``F.mish``, ``F.relu``, ``torch.tanh``,
  ``torch.sigmoid``). The encoder layer keeps its ``activation_relu_or_gelu`` flag, so its eval-mode fast
  path still runs torch's fused kernel (exact GELU; no backward there). Undo puts the function back.
- functional calls, with ``convert_(model, FewBit(...), functional=True)``: a *scoping* module, one whose
  own ``forward`` source calls ``gelu(``, ``silu(`` or ``mish(`` (after ``filter_fn`` and
  include/exclude), gets an instance ``forward`` that runs the original under a ``TorchFunctionMode``
  mapping ``F.gelu``/``F.silu``/``F.mish`` to their few-bit versions (the default N(0,1) tables; a
  calibration is not used there). Every module in a scoping module's subtree gets the same scoped
  ``forward`` (with the union of its scoping ancestors' function names), so a submodule recomputed
  alone under ``torch.utils.checkpoint`` in the backward, outside its parent's forward, runs under the
  same mode as in the forward; ``filter_fn`` selects scoping modules, not their submodules.
  Covered: every call of those functions that a scoped module's forward runs, in helpers included
  (the mode sees the function objects, so ``from torch.nn.functional import gelu`` is covered too).
  Not covered: a model whose no module names one of them in its own ``forward``; a user's own
  re-implementation (``x * torch.sigmoid(x)``); in-place calls (``F.silu(x, inplace=True)``), which
  run torch's function (the few-bit versions are out of place). The scoped ``forward`` is a small object
  holding the module, with its state in the module's ``__dict__``: ``copy.deepcopy`` gives a scoped copy
  running its own parameters, and ``torch.save``/``torch.load`` of the model keep the scope. Tested in
  eager mode only.
"""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode

from tightfit.convert import ConversionReport, FilterFn, record_edit, register_converter, replace_module
from tightfit.fewbit import functional as fb_functional
from tightfit.fewbit import modules as fb_modules
from tightfit.fewbit.activations import spec_for_module, spec_for_name
from tightfit.fewbit.config import FewBit
from tightfit.fewbit.gated import FewBitGatedMLP
from tightfit.fewbit.tables import Table

__all__ = ["is_gated_mlp"]

_GATED_PATTERN = "self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"
_NOT_POINTWISE = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU, nn.MultiheadAttention)


def is_gated_mlp(module: nn.Module) -> bool:
    """True for an MLP computing exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)) (checked on source)."""
    if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return _GATED_PATTERN in re.sub(r"\s+", "", src)


def _unsupported_reason(module: nn.Module) -> str | None:
    cls = type(module)
    if isinstance(module, (fb_modules.FewBitActivation, FewBitGatedMLP)):
        return None
    if cls.__module__ == "torch.nn.modules.activation":
        if isinstance(module, _NOT_POINTWISE):
            return None  # not a pointwise activation: nothing few-bit to do, not an omission
        if cls in (nn.PReLU, nn.RReLU):
            return f"nn.{cls.__name__} has a learned/random slope, so no fixed derivative table exists"
        return f"nn.{cls.__name__} is not in the few-bit registry"
    if cls.__module__.startswith("transformers.activations"):
        if cls.__name__ == "LinearActivation":
            return None  # identity: nothing is saved for backward
        return f"transformers {cls.__name__} is not in the few-bit registry (learned or unknown shape)"
    for base in cls.__mro__[1:]:
        if base.__module__ == "torch.nn.modules.activation" and base is not nn.Module:
            return f"subclass of nn.{base.__name__} (it may override forward), left as is"
    return None


def _table(config: FewBit, path: str, report: ConversionReport) -> Table | None:
    """The calibrated table of the activation at `path`, or None (the default N(0,1) table)."""
    cal = config.calibration
    if cal is None:
        return None
    if path not in cal.paths:
        report.notes.append(f"{path}: not in the calibration, default N(0,1) table used")
        return None
    return cal.fit(path, config.bits)


def _new_activation(
    module: nn.Module, spec: Any, params: dict[str, Any], config: FewBit, table: Table | None
):
    cls = type(module)
    bits = config.bits
    if cls is nn.GELU:
        return fb_modules.GELU(module.approximate, bits=bits, table=table)
    ours = (
        getattr(fb_modules, cls.__name__, None) if cls.__module__ == "torch.nn.modules.activation" else None
    )
    if ours is not None and ours in (getattr(fb_modules, n) for n in fb_modules.__all__):
        return ours(**params, bits=bits, table=table)
    return fb_modules.FewBitActivation(spec.name, bits=bits, table=table, **params)


def _wanted(config: FewBit, spec_name: str) -> str | None:
    names = {spec_name, spec_for_name(spec_name).table_name}
    if config.include is not None and not names & {spec_for_name(n).name for n in config.include}:
        return f"{spec_name} not in FewBit.include"
    if names & {spec_for_name(n).name for n in config.exclude}:
        return f"{spec_name} in FewBit.exclude"
    return None


# activation functions held as attributes -> the torch.nn module computing the same (for the registry)
_FUNCTION_MODULES: dict[Any, Callable[[], nn.Module]] = {
    F.gelu: nn.GELU,
    F.silu: nn.SiLU,
    F.mish: nn.Mish,
    F.relu: nn.ReLU,
    torch.tanh: nn.Tanh,
    torch.sigmoid: nn.Sigmoid,
}
# functional calls the scoped override maps, as a forward's source calls them
_CALLS = re.compile(r"\b(gelu|silu|mish)\s*\(")


@dataclass(frozen=True, eq=False)
class _AttributeSwap:
    """``parent.<name>`` (a plain instance attribute, not a submodule) went from ``old`` to ``new``: a
    `tightfit.convert.Edit` (recorded with ``record_edit``, reversed by ``convert_`` and ``undo``).

    ``kind`` "module": ``new`` is a few-bit module put where a function was (it becomes a submodule);
    "forward": ``new`` is an instance ``forward`` (``old`` None: the class's forward was used)."""

    parent: nn.Module
    path: str
    name: str
    old: Any
    new: Any
    kind: str
    state: Any = None  # "forward": the _Scope kept in the module's __dict__ beside the forward

    def in_place(self) -> bool:
        if self.kind == "module":
            return self.parent._modules.get(self.name) is self.new
        return self.parent.__dict__.get(self.name) is self.new

    def apply(self) -> None:
        if self.kind == "module":
            self.new.training = self.parent.training
            self.parent.__dict__.pop(self.name, None)
            setattr(self.parent, self.name, self.new)  # registered as a submodule
        else:
            if self.state is not None:
                self.parent.__dict__[_SCOPE] = self.state
            self.parent.__dict__[self.name] = self.new

    def put_back(self) -> None:
        if self.kind == "module":
            del self.parent._modules[self.name]
            self.parent.__dict__[self.name] = self.old
            return
        self.parent.__dict__.pop(_SCOPE, None)
        if self.old is None:
            self.parent.__dict__.pop(self.name, None)
        else:
            self.parent.__dict__[self.name] = self.old


class _FewBitFunctions(TorchFunctionMode):
    """Maps ``F.gelu``/``F.silu``/``F.mish`` to their few-bit versions while active (grad mode only).

    In-place calls (``F.silu(x, inplace=True)``) run the original function: the few-bit versions are
    out of place, and code relying on the in-place write would compute something else. Inside a mode's
    handler the mode is off, so the few-bit ops' own torch calls are not intercepted."""

    def __init__(self, bits: int, names: frozenset[str]) -> None:
        super().__init__()
        self.bits = bits
        self.names = names

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            if func is F.gelu and "gelu" in self.names:
                return fb_functional.gelu(args[0], self.bits, *args[1:], **kwargs)
            if func in (F.silu, F.mish) and not kwargs.get("inplace", len(args) > 1 and args[1]):
                if func is F.silu and "silu" in self.names:
                    return fb_functional.silu(args[0], self.bits, *args[1:], **kwargs)
                if func is F.mish and "mish" in self.names:
                    return fb_functional.mish(args[0], self.bits, *args[1:], **kwargs)
        return func(*args, **kwargs)


_SCOPE = "_tightfit_fewbit_scope"  # in a scoped module's __dict__: its _Scope


class _Scope:
    """What a scoped module's forward runs: the few-bit mode's ``bits`` and ``names``, and the forward it
    replaced (``func``, a function called with the module, or ``previous``, another instance-level
    callable called as it is). Kept in the module's ``__dict__`` and holding no reference to the module,
    so that ``copy.deepcopy`` and pickle carry it along with the module."""

    def __init__(self, module: nn.Module, bits: int, names: frozenset[str]) -> None:
        previous = module.__dict__.get("forward")
        self.bits = bits
        self.names = names
        self.previous = None
        self.func: Callable[..., Any] | None = type(module).forward
        if previous is not None:
            if isinstance(previous, types.MethodType) and previous.__self__ is module:
                self.func = previous.__func__
            else:
                self.func, self.previous = None, previous


class _ScopedForward:
    """A scoped module's instance ``forward``: the forward it replaced, under the few-bit mode (not pushed
    again when the innermost mode already is the same one, as in a scoped parent's forward).

    A small object holding the module rather than a bound method: a bound method pickles as a lookup of
    its function's name on the module, which does not find it; this one deep-copies and pickles with
    the module (the copy runs its own parameters)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        scope: _Scope = module.__dict__[_SCOPE]
        top = _get_current_function_mode()
        if isinstance(top, _FewBitFunctions) and top.bits == scope.bits and top.names == scope.names:
            return _run_scoped(module, scope, args, kwargs)
        with _FewBitFunctions(scope.bits, scope.names):
            return _run_scoped(module, scope, args, kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # what inspect.signature(module.forward) reports
        scope: _Scope = self.module.__dict__[_SCOPE]
        if scope.func is not None:
            return inspect.signature(types.MethodType(scope.func, self.module))
        return inspect.signature(scope.previous)


def _run_scoped(module: nn.Module, scope: _Scope, args: tuple, kwargs: dict[str, Any]) -> Any:
    if scope.func is not None:
        return scope.func(module, *args, **kwargs)
    return scope.previous(*args, **kwargs)


def _calls_functional(module: nn.Module) -> list[str]:
    """Names of the overridable functions the module's own forward source calls ([] if none/unknown)."""
    cls = type(module)
    if cls.__module__.startswith(("torch.", "tightfit.")) or "forward" in module.__dict__:
        return []
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return []
    return sorted(set(_CALLS.findall(src)))


def _function_attributes(
    model: nn.Module, config: FewBit, filter_fn: FilterFn | None, report: ConversionReport
) -> list[_AttributeSwap]:
    """Swaps putting few-bit modules where activation functions are held as instance attributes."""
    swaps = []
    for path, mod in model.named_modules():
        if filter_fn is not None and not filter_fn(mod, path):
            continue
        for name, value in list(vars(mod).items()):
            if name.startswith("_") or not callable(value):
                continue
            try:
                make = _FUNCTION_MODULES.get(value)
            except TypeError:  # unhashable callable
                continue
            if make is None:
                continue
            attr_path = f"{path}.{name}" if path else name
            reference = make()
            spec, params = spec_for_module(reference)  # type: ignore[misc]
            reason = _wanted(config, spec.name)
            if reason is not None:
                report.skipped.append((attr_path, reason))
                continue
            new = _new_activation(reference, spec, params, config, _table(config, attr_path, report))
            swaps.append(_AttributeSwap(mod, attr_path, name, value, new, "module"))
    return swaps


def _functional_scopes(
    model: nn.Module, config: FewBit, filter_fn: FilterFn | None
) -> tuple[list[_AttributeSwap], list[tuple[str, frozenset[str], int]]]:
    """Swaps scoping forwards under the few-bit mode, and (path, names, submodules scoped) per scoping
    module. A scoping module is one whose own forward source calls an overridable function (after
    ``filter_fn`` and include/exclude); every module of its subtree is scoped too, with the union of the
    names of its scoping ancestors, so that a submodule's recompute under checkpoint (which calls that
    submodule alone, outside its parent's forward) runs under the same mode as its forward did."""
    roots: list[tuple[str, nn.Module, frozenset[str]]] = []
    for path, mod in model.named_modules():
        if filter_fn is not None and not filter_fn(mod, path):
            continue
        wanted = [n for n in _calls_functional(mod) if _wanted(config, spec_for_name(n).name) is None]
        if wanted:
            roots.append((path, mod, frozenset(wanted)))
    names: dict[int, frozenset[str]] = {}
    paths: dict[int, tuple[str, nn.Module]] = {}
    summary = []
    for root_path, root, wanted in roots:
        count = 0
        for path, mod in root.named_modules(prefix=root_path):
            if type(mod).__module__.startswith("tightfit.") and mod is not root:
                continue  # few-bit modules: they call no overridable function
            names[id(mod)] = names.get(id(mod), frozenset()) | wanted
            paths.setdefault(id(mod), (path, mod))
            count += mod is not root
        summary.append((root_path, wanted, count))
    swaps = []
    for key, (path, mod) in paths.items():
        if mod.__dict__.get(_SCOPE) is not None:  # scoped by an earlier conversion: left as it is
            continue
        scope = _Scope(mod, config.bits, names[key])
        swaps.append(
            _AttributeSwap(
                mod,
                f"{path}.forward" if path else "forward",
                "forward",
                mod.__dict__.get("forward"),
                _ScopedForward(mod),
                "forward",
                scope,
            )
        )
    return swaps, summary


@register_converter(FewBit)
def _convert_fewbit(
    model: nn.Module, config: FewBit, filter_fn: FilterFn | None = None, *, functional: bool = False
) -> ConversionReport:
    """The `tightfit.convert_` handler for `FewBit`: plan, validate, then apply; return what was done.

    ``functional=True`` also scopes a few-bit override of ``F.gelu``/``F.silu``/``F.mish`` to the
    forwards that call them (see the module docstring)."""
    if not isinstance(functional, bool):
        raise TypeError(f"functional must be a bool, got {functional!r}")
    report = ConversionReport(technique=f"FewBit(bits={config.bits})")
    all_paths: dict[int, list[str]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        all_paths.setdefault(id(mod), []).append(path)

    plan: list[tuple[nn.Module, nn.Module]] = []  # (old, new)
    skip_under: list[str] = []  # paths of gated MLPs: their act_fn is handled by the fused op
    errors: list[str] = []
    for path, mod in model.named_modules():
        if any(path.startswith(p + ".") for p in skip_under):
            continue
        if filter_fn is not None and not filter_fn(mod, path):
            continue
        if config.gated and is_gated_mlp(mod):
            got = spec_for_module(mod.act_fn)
            if got is not None and not got[1]:  # parameter-free activation (silu, gelu, ...)
                reason = _wanted(config, got[0].name)
                if reason is None:
                    plan.append(
                        (
                            mod,
                            FewBitGatedMLP(
                                mod, got[0].name, config.bits, _table(config, f"{path}.act_fn", report)
                            ),
                        )
                    )
                    skip_under.append(path)
                    continue
        try:
            got = spec_for_module(mod)
        except ValueError as exc:
            got, reason = None, str(exc)
        else:
            reason = None if got is not None else _unsupported_reason(mod)
        if got is None:
            if reason is not None:
                if config.on_unsupported == "error":
                    errors.append(f"{path or '<root>'}: {reason}")
                else:
                    report.skipped.append((path, reason))
            continue
        spec, params = got
        reason = _wanted(config, spec.name)
        if reason is not None:
            report.skipped.append((path, reason))
            continue
        plan.append((mod, _new_activation(mod, spec, params, config, _table(config, path, report))))
    if errors:
        raise ValueError(
            "FewBit conversion stopped before changing anything; unsupported activations:\n  "
            + "\n  ".join(errors)
            + "\nUse filter_fn to leave them out, or on_unsupported='skip'."
        )
    if any(new is None for _, new in plan):
        raise AssertionError("internal: incomplete plan")
    swaps = _function_attributes(model, config, filter_fn, report)  # planned before anything changes
    for old, new in plan:
        for path in all_paths[id(old)]:
            if path:
                replace_module(model, path, new)
            report.converted.append((path, _short(old), _short(new)))
    scoped: list[tuple[str, frozenset[str], int]] = []
    if functional:
        forward_swaps, scoped = _functional_scopes(model, config, filter_fn)
        swaps += forward_swaps
    for swap in swaps:  # recorded in convert_'s journal: put back on failure and by report.undo()
        swap.apply()
        record_edit(swap)
    for swap in swaps:
        if swap.kind == "module":
            report.converted.append((swap.path, f"function {swap.old.__name__}", _short(swap.new)))
    for path, names, count in scoped:
        report.converted.append(
            (
                f"{path}.forward" if path else "forward",
                "forward",
                f"forward under a few-bit override of F.{'/F.'.join(sorted(names))}"
                + (f" (with its {count} submodules' forwards, for their recompute)" if count else ""),
            )
        )
    if not plan and not swaps:
        report.notes.append(
            "no activation module or function attribute found (functional calls like F.gelu(x) in a "
            "forward are converted with convert_(..., functional=True))"
        )
    return report


def _short(module: nn.Module) -> str:
    text = repr(module) if not list(module.children()) else f"{type(module).__name__}(...)"
    if isinstance(module, FewBitGatedMLP):
        text = f"FewBitGatedMLP({module.extra_repr()})"
    return text if len(text) < 80 else text[:77] + "..."
