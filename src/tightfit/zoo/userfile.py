"""Users' own models given as ``path/to/file.py:factory``.

The file is imported as a fresh module (its folder is put first on sys.path while it imports, so it can
import its neighbours). ``factory(**kwargs)`` returns a model, or ``(model, batch)``. When it returns only a
model, the batch comes from a ``sample_batch(**kwargs)`` function in the same file. Each failure names the
part that failed: the spec's form, the file, its import, the attribute, the call, or what the call returned.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from tightfit.zoo.registry import Factories, ModelFileError, building, resolve_device, resolve_dtype

BATCH_FUNCTION = "sample_batch"


def is_file_spec(name: str) -> bool:
    """Whether `name` looks like ``something.py:factory`` rather than a zoo name."""
    path, sep, _ = name.rpartition(":")
    return bool(sep) and path.endswith(".py")


def split_spec(spec: str) -> tuple[Path, str]:
    path, sep, attr = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not attr.isidentifier():
        raise ModelFileError(
            f"cannot read model spec {spec!r}: expected path/to/file.py:factory, where factory is a function "
            "in that file that returns an nn.Module or (module, batch)"
        )
    return Path(path), attr


def import_file(path: Path) -> ModuleType:
    """Import a Python file as a new module, or raise `ModelFileError` naming the file or the import error."""
    if not path.is_file():
        where = path if path.is_absolute() else f"{path} (relative to {Path.cwd()})"
        raise ModelFileError(f"model file not found: {where}")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"tightfit_user_{resolved.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"cannot import {path}: not a loadable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(resolved.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ModelFileError(f"importing {path} failed: {_where(e, resolved)}{type(e).__name__}: {e}") from e
    finally:
        try:
            sys.path.remove(str(resolved.parent))
        except ValueError:
            pass
    return module


def _where(e: BaseException, file: Path) -> str:
    """'line N: ' for the deepest frame of the traceback that lies in the user's file."""
    line = None
    for frame in traceback.extract_tb(e.__traceback__):
        if Path(frame.filename).resolve() == file:
            line = frame.lineno
    if isinstance(e, SyntaxError) and e.lineno and Path(e.filename or "").resolve() == file:
        line = e.lineno
    return f"line {line}: " if line else ""


def _callables(module: ModuleType) -> list[str]:
    return sorted(
        n
        for n, v in vars(module).items()
        if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
    )


def _accepted(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of `kwargs` that `fn` accepts (all of them if it takes **kwargs); None values dropped."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _wrong_dtype(model: nn.Module, dtype: torch.dtype | None) -> bool:
    """Whether a floating parameter is not in `dtype`. Buffers do not count: a model keeps some in another
    dtype by design (a rotary embedding's float32 ``inv_freq`` in a bfloat16 Llama), as from_pretrained
    keeps them."""
    return dtype is not None and any(p.is_floating_point() and p.dtype != dtype for p in model.parameters())


def _wrong_device(model: nn.Module, device: torch.device | None) -> bool:
    """Whether a parameter or buffer is not on `device`."""
    if device is None:
        return False
    return any(
        t.device.type != device.type or device.index not in (None, t.device.index)
        for t in [*model.parameters(), *model.buffers()]
    )


def _move(batch: Any, dtype: torch.dtype | None, device: torch.device | None) -> Any:
    """Floating tensors to `dtype`, all tensors to `device`, through dicts, lists and tuples."""
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point():
            batch = batch.to(dtype)
        return batch.to(device) if device is not None else batch
    if isinstance(batch, dict):
        return {k: _move(v, dtype, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, dtype, device) for v in batch)
    return batch


def load(spec: str) -> Factories:
    """``path/to/file.py:factory`` -> (model_factory, batch_factory), importing the file now.

    ``model_factory(**kwargs)`` calls the user's factory with the keyword arguments it accepts (dtype and
    device it does not take are applied to the model it returns); ``batch_factory(**kwargs)`` calls
    ``sample_batch`` from the file if there is one, else returns the batch that the factory returned with the
    model (floating tensors cast to `dtype`, all moved to `device`).
    """
    path, attr = split_spec(spec)
    module = import_file(path)
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        found = ", ".join(_callables(module)) or "none"
        what = "no attribute" if factory is None else f"a non-callable {type(factory).__name__}"
        raise ModelFileError(f"{path} has {what} named {attr!r}; callables defined there: {found}")
    sample_batch = getattr(module, BATCH_FUNCTION, None)
    cached: dict[str, Any] = {}

    def call_factory(**kwargs: Any) -> tuple[nn.Module, Any]:
        try:
            out = factory(**_accepted(factory, kwargs))
        except Exception as e:
            raise ModelFileError(
                f"{spec}: the factory raised {_where(e, path.resolve())}{type(e).__name__}: {e}"
            ) from e
        model, batch = (out[0], out[1]) if isinstance(out, tuple) and len(out) == 2 else (out, None)
        if not isinstance(model, nn.Module):
            got = type(model).__name__ if model is out else f"({type(model).__name__}, ...)"
            raise ModelFileError(
                f"{spec}: the factory returned {got}, expected an nn.Module or (nn.Module, batch)"
            )
        cached["batch"] = batch
        return model, batch

    def model_factory(**kwargs: Any) -> nn.Module:
        # A factory that does not take dtype/device still builds in them: they are the default dtype and
        # device while it runs (this also works under FakeTensorMode, where module.to() cannot swap).
        dtype = resolve_dtype(kwargs["dtype"]) if kwargs.get("dtype") is not None else None
        device = resolve_device(kwargs["device"]) if kwargs.get("device") is not None else None
        with building(dtype or torch.get_default_dtype(), device, seed=None):
            model = call_factory(**kwargs)[0]
        move_dtype, move_device = _wrong_dtype(model, dtype), _wrong_device(model, device)
        if move_dtype or move_device:
            try:
                model = model.to(device=device if move_device else None, dtype=dtype if move_dtype else None)
            except RuntimeError as e:
                raise ModelFileError(
                    f"{spec}: the model's parameters are not {dtype or ''} on {device or 'the device'} and "
                    f"cannot be moved here ({e}); let {attr}() take dtype= and device= arguments"
                ) from e
        return model

    def batch_factory(**kwargs: Any) -> Any:
        dtype = resolve_dtype(kwargs["dtype"]) if kwargs.get("dtype") is not None else None
        device = resolve_device(kwargs["device"]) if kwargs.get("device") is not None else None
        if callable(sample_batch):
            try:
                return sample_batch(**_accepted(sample_batch, kwargs))
            except Exception as e:
                raise ModelFileError(
                    f"{path}: {BATCH_FUNCTION}() raised {_where(e, path.resolve())}{type(e).__name__}: {e}"
                ) from e
        if "batch" not in cached:
            call_factory()
        if cached["batch"] is None:
            raise ModelFileError(
                f"{spec}: the factory returned only a model, so there is no sample batch: "
                f"return (model, batch) from {attr}(), or define {BATCH_FUNCTION}(...) in {path}"
            )
        return _move(cached["batch"], dtype, device)

    model_factory.__doc__ = f"{attr}() from {path}"
    batch_factory.__doc__ = f"sample batch for {spec}"
    return Factories(model_factory, batch_factory)
