"""Tiny models and dynamically padded data shared by the integration tests and the examples' --tiny runs."""

from __future__ import annotations

import copy
from typing import Any

import torch

from tightfit.memory import profile
from tightfit.remat.config import RematConfig

# planning config of the tests: fewer measured options, so that planning takes seconds on a shared CPU
FAST = RematConfig(op_level=False, segments=False, options=())
LENGTHS = (24, 8, 16)  # three sequence lengths, the longest first


def tiny_bert(num_labels: int = 3, vocab: int = 64):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()  # eval, as from_pretrained returns it


class PaddedDataset(torch.utils.data.Dataset):
    """Token sequences whose lengths cycle through ``lengths`` in pairs (batch size 2 => one length per
    batch), labels in [0, 3)."""

    def __init__(self, n: int, lengths: tuple[int, ...] = LENGTHS, vocab: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            length = lengths[(i // 2) % len(lengths)]
            ids = torch.randint(1, vocab, (length,), generator=g).tolist()
            self.items.append({"input_ids": ids, "labels": int(torch.randint(0, 3, (), generator=g))})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def pad_collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Dynamic padding: every batch padded to its own longest sequence."""
    length = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    mask = torch.zeros(len(items), length, dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        ids[row, :n] = torch.tensor(it["input_ids"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([it["labels"] for it in items])}


def step_peak(model: torch.nn.Module, batch: Any) -> int:
    """Ruler peak of one AdamW training step of a copy of ``model`` on ``batch`` (no plan)."""
    with torch.random.fork_rng():
        m = copy.deepcopy(model).train()
        return profile(m, batch, optimizer=torch.optim.AdamW(m.parameters()), time_steps=0).peak_bytes
