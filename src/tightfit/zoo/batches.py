"""Sample-batch factories: fixed-seed random token ids or images, with labels, as a dict of model kwargs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tightfit.zoo.registry import ZooError, batch_generator, positive, resolve_device, resolve_dtype

LabelRule = Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]]


def _reject(name: str, option: str, value: Any, takes: str) -> None:
    if value is not None:
        raise ZooError(f"{name} takes {takes}, not {option} (got {option}={value!r})")


def causal_lm_labels(ids: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Next-token prediction: the model shifts the labels itself (Hugging Face convention)."""
    return {"input_ids": ids, "labels": ids.clone()}


def masked_lm_labels(mask_token_id: int, fraction: float = 0.15) -> LabelRule:
    """BERT-style: `fraction` of positions are replaced by the mask token and predicted; the rest are -100."""

    def rule(ids: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        chosen = torch.rand(ids.shape, generator=g) < fraction
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        inputs = torch.where(chosen, torch.full_like(ids, mask_token_id), ids)
        return {"input_ids": inputs, "attention_mask": torch.ones_like(ids), "labels": labels}

    return rule


def token_batch_factory(
    name: str,
    vocab_size: int,
    max_len: int,
    default_batch: int,
    default_seq: int,
    labels: LabelRule = causal_lm_labels,
    low: int = 0,
) -> Callable[..., dict[str, torch.Tensor]]:
    """A factory of token batches of shape (batch_size, seq_len) with ids in [low, vocab_size)."""

    def sample_batch(
        batch_size: int | None = None,
        seq_len: int | None = None,
        image_size: int | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        seed: int = 0,
        vocab_size: int = vocab_size,
    ) -> dict[str, torch.Tensor]:
        _reject(name, "image_size", image_size, "token sequences (seq_len)")
        resolve_dtype(dtype)  # token ids are integers; the dtype is still validated for a uniform interface
        b = positive(name, "batch_size", default_batch if batch_size is None else batch_size)
        t = positive(name, "seq_len", default_seq if seq_len is None else seq_len)
        if t > max_len:
            raise ZooError(f"{name}: seq_len {t} exceeds the model's {max_len} positions")
        g = batch_generator(seed)
        ids = torch.randint(low, vocab_size, (b, t), generator=g, device="cpu")
        dev = resolve_device(device)
        return {k: v.to(dev) for k, v in labels(ids, g).items()}

    sample_batch.__doc__ = (
        f"Sample batch for {name}: random ids (batch {default_batch}, seq {default_seq} by default)."
    )
    return sample_batch


def image_batch_factory(
    name: str,
    channels: int,
    num_classes: int,
    default_batch: int,
    default_size: int,
    dense: bool = False,
    multiple_of: int = 1,
) -> Callable[..., dict[str, torch.Tensor]]:
    """A factory of image batches ``{"x": (B, C, N, N), "labels": (B,) or (B, N, N) if dense}``."""

    def sample_batch(
        batch_size: int | None = None,
        seq_len: int | None = None,
        image_size: int | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> dict[str, torch.Tensor]:
        _reject(name, "seq_len", seq_len, "images (image_size)")
        b = positive(name, "batch_size", default_batch if batch_size is None else batch_size)
        n = positive(name, "image_size", default_size if image_size is None else image_size)
        if n % multiple_of:
            raise ZooError(f"{name}: image_size must be a multiple of {multiple_of}, got {n}")
        g = batch_generator(seed)
        x = torch.randn((b, channels, n, n), generator=g, device="cpu", dtype=torch.float32)
        y_shape = (b, n, n) if dense else (b,)
        y = torch.randint(0, num_classes, y_shape, generator=g, device="cpu")
        dev = resolve_device(device)
        return {"x": x.to(device=dev, dtype=resolve_dtype(dtype)), "labels": y.to(dev)}

    sample_batch.__doc__ = (
        f"Sample batch for {name}: random images (batch {default_batch}, {default_size}px)."
    )
    return sample_batch
