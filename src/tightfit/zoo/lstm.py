"""An LSTM language model written as an explicit loop over time steps: unrolled, it is a chain.

The recurrence is `LSTMStack`: ``step(x_t, state)`` advances every layer by one time step and
``run(xs, state, start, stop)`` runs steps ``start..stop-1``. ``forward`` is ``run`` over the whole sequence,
so a rematerialization helper can checkpoint segments of time steps by calling ``run`` per segment (the
carried ``state`` is the only thing that crosses a segment boundary, besides the segment's own inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from tightfit.zoo.batches import token_batch_factory
from tightfit.zoo.registry import ModelSpec, dataclass_model_factory, register

State = list[tuple[torch.Tensor, torch.Tensor]]  # (h, c) per layer


@dataclass(frozen=True)
class LSTMConfig:
    vocab_size: int = 10000  # Zaremba et al.'s "medium" PTB model: 2 x 650, 19.8M params
    embed_dim: int = 650
    hidden_size: int = 650
    num_layers: int = 2
    dropout: float = 0.1  # on every non-recurrent connection (embedding, between layers, before the head)


class LSTMStack(nn.Module):
    """Stacked `nn.LSTMCell`s advanced one time step at a time."""

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        sizes = [config.embed_dim] + [config.hidden_size] * (config.num_layers - 1)
        self.cells = nn.ModuleList(nn.LSTMCell(n, config.hidden_size) for n in sizes)
        self.dropout = nn.Dropout(config.dropout)

    def initial_state(self, xs: torch.Tensor) -> State:
        """Zero (h, c) for every layer, batch size/dtype/device taken from `xs` (B, T, E)."""
        zeros = xs.new_zeros(xs.shape[0], self.cells[0].hidden_size)
        return [(zeros, zeros) for _ in self.cells]

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One time step through all layers: (top layer's output after dropout, new state)."""
        new_state: State = []
        inp = x_t
        for cell, (h, c) in zip(self.cells, state):
            h, c = cell(inp, (h, c))
            new_state.append((h, c))
            inp = self.dropout(h)
        return inp, new_state

    def run(self, xs: torch.Tensor, state: State, start: int, stop: int) -> tuple[torch.Tensor, State]:
        """Steps start..stop-1 of `xs` (B, T, E): (outputs (B, stop-start, H), state after step stop-1)."""
        outs = []
        for t in range(start, stop):
            out, state = self.step(xs[:, t], state)
            outs.append(out)
        return torch.stack(outs, dim=1), state

    def forward(self, xs: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        return self.run(xs, self.initial_state(xs) if state is None else state, 0, xs.shape[1])


class LSTMLanguageModel(nn.Module):
    """Embedding, `LSTMStack`, linear head. ``forward(x, labels=None)``: logits (B, T, V), or the next-token
    cross-entropy when labels (B, T) are given (shifted inside, as in Hugging Face causal LMs)."""

    def __init__(self, config: LSTMConfig = LSTMConfig()) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.rnn = LSTMStack(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        out, _ = self.rnn(self.dropout(self.embed(x)))
        logits = self.head(out)
        if labels is None:
            return logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def _lm_labels(ids: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"x": ids, "labels": ids.clone()}


for _name, _cfg, _batch, _seq, _desc in (
    (
        "lstm",
        LSTMConfig(),
        20,
        35,
        "LSTM LM: 2 layers x 650, vocab 10000, an nn.LSTMCell loop over time (19.8M params)",
    ),
    (
        "lstm-tiny",
        LSTMConfig(vocab_size=64, embed_dim=16, hidden_size=16),
        2,
        8,
        "lstm wiring at test size: 2 layers x 16, vocab 64",
    ),
):
    register(
        ModelSpec(
            name=_name,
            model_factory=dataclass_model_factory(_name, LSTMLanguageModel, _cfg),
            batch_factory=token_batch_factory(_name, _cfg.vocab_size, 1 << 20, _batch, _seq, _lm_labels),
            input_kind="tokens",
            description=_desc,
            family="lstm",
        )
    )
