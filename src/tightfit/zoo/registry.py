"""The name -> (model factory, sample-batch factory) registry, and the errors a user can cause.

A model factory is called as ``factory(dtype=None, device=None, **config_overrides) -> nn.Module``; a
batch factory as ``batch(batch_size=None, seq_len=None, image_size=None, dtype=None, device=None, seed=0)``
and returns a dict of keyword arguments whose call returns the loss (``model(**batch).loss`` or a scalar).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

ModelFactory = Callable[..., nn.Module]
BatchFactory = Callable[..., Any]


class ZooError(ValueError):
    """A model name, model file, or batch option given by the user is not valid; the message says why."""


class UnknownModelError(ZooError):
    """The model name is not registered (the message lists the valid names and close matches)."""


class ModelFileError(ZooError):
    """Loading ``path/to/file.py:factory`` failed; the message says which part (file, import, name, call)."""


class Factories(NamedTuple):
    """What `tightfit.zoo.get` returns: unpack as ``model_factory, batch_factory = zoo.get(name)``."""

    model_factory: ModelFactory
    batch_factory: BatchFactory


@dataclass(frozen=True)
class ModelSpec:
    """One registered model: its factories, the kind of input it takes, and a line saying what it is."""

    name: str
    model_factory: ModelFactory
    batch_factory: BatchFactory
    input_kind: str  # "tokens" (takes seq_len) or "image" (takes image_size)
    description: str
    family: str  # e.g. "gpt2", "llama", "resnet": groups a model with its tiny/cpu variants

    @property
    def factories(self) -> Factories:
        return Factories(self.model_factory, self.batch_factory)


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Add a model to the zoo (names are case-sensitive, lower-case by convention)."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"a model named {spec.name!r} is already registered; pass replace=True to override")
    _REGISTRY[spec.name] = spec
    return spec


def names(include_tiny: bool = True) -> list[str]:
    """Registered model names, sorted; `include_tiny=False` hides the ``-tiny`` test variants."""
    return sorted(n for n in _REGISTRY if include_tiny or not n.endswith("-tiny"))


def spec(name: str) -> ModelSpec:
    """The registry entry for `name`, or an `UnknownModelError` listing the valid names and close matches."""
    if not isinstance(name, str):
        raise UnknownModelError(f"a model name must be a string, got {type(name).__name__}")
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name.lower(), list(_REGISTRY), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}: {hint}valid names are {', '.join(names())}, "
        "or a file of your own as path/to/file.py:factory"
    )


# ----------------------------------------------------------------------------------- shared helpers
_FLOAT_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A floating dtype from a torch.dtype or its name ('bfloat16', 'torch.float16'); None -> float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
        if key not in _FLOAT_DTYPES:
            raise ZooError(f"unknown dtype {dtype!r}: expected one of {', '.join(_FLOAT_DTYPES)}")
        return _FLOAT_DTYPES[key]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ZooError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype


def resolve_device(device: torch.device | str | None) -> torch.device:
    try:
        return torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        raise ZooError(f"invalid device {device!r}: {e}") from e


@contextmanager
def building(dtype: torch.dtype, device: torch.device | str | None, seed: int | None) -> Iterator[None]:
    """Construct modules directly in `dtype` on `device` (no float32 copy first), with a fixed seed.

    device=None keeps the ambient default device, so ``with torch.device("meta"): factory()`` builds on meta.
    The global RNG state is restored afterwards, so building a model does not change later random draws.
    """
    on_device = nullcontext() if device is None else resolve_device(device)
    # fork the RNG of the device built on too (manual_seed seeds every device)
    forked = (
        [on_device.index or 0] if isinstance(on_device, torch.device) and on_device.type == "cuda" else []
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=forked), on_device:
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        torch.set_default_dtype(previous)


def check_overrides(name: str, overrides: dict[str, Any], valid: set[str] | list[str]) -> None:
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ZooError(
            f"{name}: unknown config option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(sorted(valid))}"
        )


def batch_generator(seed: int) -> torch.Generator:
    """Sample batches are drawn on the CPU from their own generator, then moved: same values on any device."""
    return torch.Generator(device="cpu").manual_seed(seed)


def positive(name: str, what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ZooError(f"{name}: {what} must be a positive integer, got {value!r}")
    return value


def dataclass_model_factory(name: str, cls: Callable[[Any], nn.Module], base: Any) -> ModelFactory:
    """A model factory for a plain-torch model built as ``cls(config)`` from a frozen dataclass config."""

    def model_factory(
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        seed: int | None = 0,
        **overrides: Any,
    ) -> nn.Module:
        check_overrides(name, overrides, {f.name for f in dataclasses.fields(base)})
        config = dataclasses.replace(base, **overrides)
        with building(resolve_dtype(dtype), device, seed):
            model = cls(config)
        return model.train()

    model_factory.__doc__ = f"{name}: {getattr(cls, '__name__', cls)}({base}), random weights (seed 0)."
    return model_factory
