"""Helpers shared by tightfit's tests and benchmarks, public so that anyone checking a memory-saving change
measures it the same way: tiny models, the peak of one training step, and gradient equality.

- `build` / `ZOO_TINY`: the zoo's ``-tiny`` models, a little deeper and with batches large enough that
  activations (not parameters or logits) dominate the peak, dropout on;
- `Block` / `mlp`: small models whose saved bytes can be derived by hand;
- `step_peak`: the ruler's peak of one training step, measured independently of any planner;
- `grads_after_step` / `same_grads`: gradients under a fixed seed, compared bit for bit.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tightfit import zoo
from tightfit._step import call_model, loss_of
from tightfit._tree import same_tensors
from tightfit.memory import LiveTracker, ensure_optimizer_state

__all__ = [
    "ZOO_TINY",
    "build",
    "clone",
    "Block",
    "TinyLM",
    "mlp",
    "step_peak",
    "grads_after_step",
    "same_grads",
]

# zoo name -> (config overrides, batch options)
ZOO_TINY: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "gpt2-tiny": ({"n_layer": 4}, {"batch_size": 4, "seq_len": 64}),
    "bert-base-tiny": ({"num_hidden_layers": 4}, {"batch_size": 4, "seq_len": 64}),
    "llama-1b-tiny": ({"num_hidden_layers": 4, "attention_dropout": 0.1}, {"batch_size": 4, "seq_len": 64}),
    "resnet50-tiny": ({}, {"batch_size": 4}),
    "unet-tiny": ({}, {}),
    "lstm-tiny": ({}, {"seq_len": 12}),
}


def build(name: str, **config: Any) -> tuple[torch.nn.Module, Any]:
    """(model in train mode, batch) for a tiny zoo model, built under seed 0 (``config`` overrides the
    model's configuration on top of `ZOO_TINY`'s)."""
    model_factory, batch_factory = zoo.get(name)
    overrides, batch_options = ZOO_TINY.get(name, ({}, {}))
    overrides = {**overrides, **config}
    torch.manual_seed(0)
    model = model_factory(**overrides).train()
    batch = batch_factory(**batch_options)
    if name.startswith(("gpt2", "llama")):
        batch = {**batch, "use_cache": False}
    return model, batch


def clone(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy of `model` (same weights and state), to compare a converted model with."""
    return copy.deepcopy(model)


class Block(nn.Module):
    """A pre-LN transformer block written out op by op, so the tensors it saves for backward are known."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.act, self.out = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(self.act(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    """A small causal LM of `Block`s: embedding, pre-LN transformer blocks, head; ``model(ids, labels)``
    returns the mean cross-entropy (the distributed tests and the torchrun examples train it)."""

    def __init__(self, vocab: int = 256, d: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, 4) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for block in self.blocks:
            h = block(h)
        return F.cross_entropy(self.head(self.norm(h)).flatten(0, 1), labels.flatten())


def mlp(width: int = 1024) -> nn.Sequential:
    """Linear(256, width), ReLU, Linear(width, width), GELU, Linear(width, 10): a classifier whose hidden
    activations, of a size set by `width`, dominate what it saves."""
    return nn.Sequential(
        nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10)
    )


def grads_after_step(model: torch.nn.Module, batch: Any, seed: int = 1) -> list[torch.Tensor | None]:
    """Gradients of one forward/backward under a fixed seed (dropout masks depend on it); the model's
    ``.grad`` fields are left as None."""
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    loss_of(call_model(model, batch)).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return grads


def same_grads(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> bool:
    """Whether two results of `grads_after_step` are equal bit for bit (None where both have no grad)."""
    return same_tensors(a, b)


def step_peak(
    model: torch.nn.Module,
    batch: Any,
    optimizer: torch.optim.Optimizer | None = None,
    keep_output: bool = True,
) -> int:
    """The ruler's peak of one training step, measured here independently of the planner, with the
    procedure of ``tightfit.profile`` (optimizer state created first; the output lives until the end,
    or only the loss does with ``keep_output=False``)."""
    if optimizer is not None:
        ensure_optimizer_state(optimizer)
        optimizer.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad = None
    with LiveTracker(track=[model, optimizer, batch]) as t:
        out = call_model(model, batch)
        loss = loss_of(out)
        if not keep_output:
            out = None
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        del out, loss
    for p in model.parameters():
        p.grad = None
    return t.peak
