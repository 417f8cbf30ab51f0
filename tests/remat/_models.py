"""Tiny models for the remat tests: the zoo's ``-tiny`` variants, made a little deeper and given batches
large enough that activations (not parameters or logits) dominate the peak, with dropout on."""

from __future__ import annotations

import copy
from typing import Any

import torch

from tightfit._step import call_model, loss_of
from tightfit.memory import LiveTracker

# name -> (config overrides, batch options)
ZOO_TINY: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "gpt2-tiny": ({"n_layer": 4}, {"batch_size": 4, "seq_len": 64}),
    "bert-base-tiny": ({"num_hidden_layers": 4}, {"batch_size": 4, "seq_len": 64}),
    "llama-1b-tiny": ({"num_hidden_layers": 4, "attention_dropout": 0.1}, {"batch_size": 4, "seq_len": 64}),
    "resnet50-tiny": ({}, {"batch_size": 4}),
    "unet-tiny": ({}, {}),
    "lstm-tiny": ({}, {"seq_len": 12}),
}


def build(name: str, **config: Any) -> tuple[torch.nn.Module, Any]:
    """(model in train mode, batch) for a tiny zoo model, built under seed 0 (``config`` overrides)."""
    import tightfit.zoo as zoo

    model_factory, batch_factory = zoo.get(name)
    overrides, batch_options = ZOO_TINY.get(name, ({}, {}))
    overrides = {**overrides, **config}
    torch.manual_seed(0)
    model = model_factory(**overrides).train()
    batch = batch_factory(**batch_options)
    if name.startswith(("gpt2", "llama")):
        batch = {**batch, "use_cache": False}
    return model, batch


def grads_after_step(model: torch.nn.Module, batch: Any, seed: int = 1) -> list[torch.Tensor | None]:
    """Gradients of one forward/backward under a fixed seed (dropout masks depend on it)."""
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    loss_of(call_model(model, batch)).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return grads


def same_grads(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a, b)
    )


def step_peak(
    model: torch.nn.Module,
    batch: Any,
    optimizer: torch.optim.Optimizer | None = None,
    keep_output: bool = True,
) -> int:
    """The ruler's peak of one training step, measured here independently of the planner, with the
    procedure of ``tightfit.profile`` (optimizer state created first; the output lives until the end,
    or only the loss does with ``keep_output=False``)."""
    from tightfit.memory import ensure_optimizer_state

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


def clone(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)
