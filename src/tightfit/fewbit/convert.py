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
shared between several parents is replaced at every path by one new module. Activations computed
functionally inside a forward (``F.gelu(x)`` in code, not a module) cannot be seen and are not converted.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from torch import nn

from tightfit.convert import ConversionReport, FilterFn, register_converter, replace_module
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


@register_converter(FewBit)
def _convert_fewbit(model: nn.Module, config: FewBit, filter_fn: FilterFn | None = None) -> ConversionReport:
    """The `tightfit.convert_` handler for `FewBit`: plan, validate, then apply; return what was done."""
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
    for old, new in plan:
        for path in all_paths[id(old)]:
            if path:
                replace_module(model, path, new)
            report.converted.append((path, _short(old), _short(new)))
    if not plan:
        report.notes.append(
            "no activation module found (functional calls like F.gelu(x) cannot be converted)"
        )
    return report


def _short(module: nn.Module) -> str:
    text = repr(module) if not list(module.children()) else f"{type(module).__name__}(...)"
    if isinstance(module, FewBitGatedMLP):
        text = f"FewBitGatedMLP({module.extra_repr()})"
    return text if len(text) < 80 else text[:77] + "..."
