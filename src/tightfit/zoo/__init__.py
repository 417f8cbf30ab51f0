"""Model factories with sample batches, for benchmarks, the CLI and tests.

``model_factory, batch_factory = tightfit.zoo.get("gpt2")`` gives a function that builds the model (random
weights, nothing downloaded; ``model_factory(dtype=..., device=..., **config_overrides)``) and one that builds
a fixed-seed sample batch (``batch_factory(batch_size=..., seq_len=... | image_size=..., dtype=...,
device=...)``), a dict such that ``model(**batch)`` returns the loss (a scalar, or an output with ``.loss``).

Built in (``names()``): GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl, and gpt2-small-cpu for CPU benchmarks),
bert-base, roberta-base, llama-1b (from `transformers`, imported only when built); resnet50, unet and lstm in
plain torch. Every model has a ``-tiny`` variant for tests. ``get("path/to/file.py:factory")`` loads a model
of your own (see `tightfit.zoo.userfile`).
"""

from __future__ import annotations

from tightfit.zoo import hf, lstm, vision  # noqa: F401  (importing registers the models)
from tightfit.zoo.registry import (
    BatchFactory,
    Factories,
    ModelFactory,
    ModelFileError,
    ModelSpec,
    UnknownModelError,
    ZooError,
    names,
    register,
    spec,
)
from tightfit.zoo.userfile import is_file_spec, load


def get(name: str) -> Factories:
    """(model_factory, batch_factory) for a zoo name or ``path/to/file.py:factory``.

    Raises `UnknownModelError` (listing valid names and close matches) or `ModelFileError` (saying which part
    of loading the file failed); both are `ZooError`, a ValueError.
    """
    if isinstance(name, str) and is_file_spec(name):
        return load(name)
    return spec(name).factories


__all__ = [
    # look-up
    "get",
    "names",
    "spec",
    "load",
    "register",
    # types
    "ModelSpec",
    "Factories",
    "ModelFactory",
    "BatchFactory",
    # errors
    "ZooError",
    "UnknownModelError",
    "ModelFileError",
]
