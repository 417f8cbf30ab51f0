"""Transformer models from `transformers`, built from configs with random weights; nothing is downloaded.

`transformers` is imported only when a factory is called, so the zoo (and tightfit) import without it.
Real sizes: gpt2 124M, gpt2-medium 355M, gpt2-large 774M, gpt2-xl 1.56B, bert-base 110M, roberta-base
125M, llama-1b 1.00B (Llama-2-style: SwiGLU, RMSNorm, grouped-query attention, untied embeddings).
Dropout stays at each config's default (0.1 for GPT-2/BERT), as in real training.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tightfit.zoo.batches import causal_lm_labels, masked_lm_labels, token_batch_factory
from tightfit.zoo.registry import (
    ModelSpec,
    ZooError,
    building,
    check_overrides,
    register,
    resolve_dtype,
)


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only: never reach for the hub
    try:
        import transformers
    except ImportError as e:
        raise ZooError(
            "this model is built with `transformers`, which is not installed: "
            "pip install 'tightfit[transformers]'"
        ) from e
    return transformers


def _hf_factory(
    name: str, config_class: str, model_class: str, config: dict[str, Any], loss_type: str
) -> Callable[..., nn.Module]:
    def model_factory(
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        seed: int | None = 0,
        **overrides: Any,
    ) -> nn.Module:
        tf = _transformers()
        cfg_cls = getattr(tf, config_class)
        check_overrides(name, overrides, set(cfg_cls().to_dict()) | set(config))
        # No KV cache: useless in training, and a recomputed (checkpointed) block would append to it twice.
        defaults = {"use_cache": False} if "use_cache" in cfg_cls().to_dict() else {}
        cfg = cfg_cls(**{**defaults, **config, **overrides})
        with building(resolve_dtype(dtype), device, seed):
            model = getattr(tf, model_class)(cfg)
        model.loss_type = loss_type  # GPT2LMHeadModel's class name does not name its loss; say it
        model.train()
        return model

    model_factory.__doc__ = (
        f"{name}: transformers.{model_class} from {config_class}({config}), random weights."
    )
    return model_factory


def _register(
    name: str,
    family: str,
    description: str,
    config_class: str,
    model_class: str,
    config: dict[str, Any],
    *,
    vocab: int,
    positions: int,
    batch: int,
    seq: int,
    masked: int | None = None,
    low: int = 0,
) -> None:
    labels = masked_lm_labels(masked) if masked is not None else causal_lm_labels
    register(
        ModelSpec(
            name=name,
            model_factory=_hf_factory(
                name, config_class, model_class, config, "ForMaskedLM" if masked else "ForCausalLM"
            ),
            batch_factory=token_batch_factory(name, vocab, positions, batch, seq, labels, low=low),
            input_kind="tokens",
            description=description,
            family=family,
        )
    )


# ------------------------------------------------------------------------------------------------ GPT-2
_GPT2_SIZES = {  # (layers, width, heads): the published GPT-2 sizes
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}
_TINY_TEXT = {"batch": 2, "seq": 16}

for _name, (_l, _d, _h) in _GPT2_SIZES.items():
    _register(
        _name,
        "gpt2",
        f"GPT-2 {_l} layers, d={_d}, {_h} heads, vocab 50257, 1024 positions",
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_layer": _l, "n_embd": _d, "n_head": _h, "vocab_size": 50257, "n_positions": 1024},
        vocab=50257,
        positions=1024,
        batch=8,
        seq=1024,
    )
    _register(
        f"{_name}-tiny",
        "gpt2",
        f"{_name} wiring at test size: 2 layers, d=64, 4 heads, vocab 512",
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 512, "n_positions": 128}
        | {"bos_token_id": 0, "eos_token_id": 0},
        vocab=512,
        positions=128,
        **_TINY_TEXT,
    )

# A CPU-sized GPT-2 used by the benchmarks and the demo (PyTorch's checkpointing is compared on it at
# batch 8, seq 256).
_register(
    "gpt2-small-cpu",
    "gpt2",
    "GPT-2 sized for CPU benchmarks: 12 layers, d=256, 4 heads, vocab 4096, 512 positions (10.7M params)",
    "GPT2Config",
    "GPT2LMHeadModel",
    {"n_layer": 12, "n_embd": 256, "n_head": 4, "vocab_size": 4096, "n_positions": 512}
    | {"bos_token_id": 0, "eos_token_id": 0},
    vocab=4096,
    positions=512,
    batch=8,
    seq=256,
)

# ----------------------------------------------------------------------------------- BERT / RoBERTa
_register(
    "bert-base",
    "bert",
    "BERT-base masked LM: 12 layers, d=768, 12 heads, vocab 30522, 512 positions",
    "BertConfig",
    "BertForMaskedLM",
    {},
    vocab=30522,
    positions=512,
    batch=8,
    seq=512,
    masked=103,  # [MASK] in the uncased WordPiece vocabulary
    low=1000,  # ordinary word pieces, not special tokens
)
_register(
    "bert-base-tiny",
    "bert",
    "bert-base wiring at test size: 2 layers, d=64, 4 heads, vocab 512",
    "BertConfig",
    "BertForMaskedLM",
    {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256}
    | {"vocab_size": 512, "max_position_embeddings": 128},
    vocab=512,
    positions=128,
    masked=3,
    low=5,
    **_TINY_TEXT,
)
# RoBERTa offsets positions by padding_idx + 1 = 2, so max_position_embeddings = positions + 2.
_register(
    "roberta-base",
    "roberta",
    "RoBERTa-base masked LM: 12 layers, d=768, 12 heads, vocab 50265, 512 positions",
    "RobertaConfig",
    "RobertaForMaskedLM",
    {"vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1}
    | {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
    vocab=50265,
    positions=512,
    batch=8,
    seq=512,
    masked=50264,  # <mask>
    low=4,
)
_register(
    "roberta-base-tiny",
    "roberta",
    "roberta-base wiring at test size: 2 layers, d=64, 4 heads, vocab 512",
    "RobertaConfig",
    "RobertaForMaskedLM",
    {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256}
    | {"vocab_size": 512, "max_position_embeddings": 130, "type_vocab_size": 1}
    | {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
    vocab=512,
    positions=128,
    masked=3,
    low=4,
    **_TINY_TEXT,
)

# ------------------------------------------------------------------------------------------- Llama
# hidden 2048, 16 layers, 32 query / 8 key-value heads (GQA), SwiGLU intermediate 7168, vocab 32000, untied:
# 16 x (10.5M attention + 44.0M MLP) + 2 x 65.5M embeddings = 1.004B parameters.
_register(
    "llama-1b",
    "llama",
    "Llama-style decoder, 1.00B params: 16 layers, d=2048, 32 heads / 8 kv heads, SwiGLU 7168, RMSNorm",
    "LlamaConfig",
    "LlamaForCausalLM",
    {"hidden_size": 2048, "intermediate_size": 7168, "num_hidden_layers": 16, "num_attention_heads": 32}
    | {"num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 2048}
    | {"tie_word_embeddings": False, "rms_norm_eps": 1e-5},
    vocab=32000,
    positions=2048,
    batch=8,
    seq=512,
)
_register(
    "llama-1b-tiny",
    "llama",
    "llama-1b wiring at test size: 2 layers, d=64, 4 heads / 2 kv heads, SwiGLU 128, vocab 512",
    "LlamaConfig",
    "LlamaForCausalLM",
    {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    | {"num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 128}
    | {"tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None},
    vocab=512,
    positions=128,
    **_TINY_TEXT,
)
