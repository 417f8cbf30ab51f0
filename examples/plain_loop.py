"""A plain PyTorch loop + tightfit: one line keeps every step within a memory budget.

    python examples/plain_loop.py                 # a torch nn.TransformerEncoder LM on Python sources
    python examples/plain_loop.py --fewbit        # also 2-bit GELU backward in every encoder layer (lossy)
    python examples/plain_loop.py --tiny          # seconds (the test suite)

``tightfit.integrations.attach(model, budget, optimizer=opt)`` plans on the first training forward and
on every longer batch; the loop itself does not change. The model is built from torch's own
``nn.TransformerEncoderLayer(activation="gelu")``, whose GELU is a function attribute:
``tightfit.convert_(model, tightfit.FewBit(bits=2))`` converts it in every layer.
"""

from __future__ import annotations

import argparse
import copy
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tightfit
from tightfit.integrations import attach
from tightfit.integrations.hook import StepMeter


class ByteLM(nn.Module):
    """Bytes -> embedding -> causal nn.TransformerEncoder (GELU) -> next-byte logits; returns the loss."""

    def __init__(self, d_model: int = 128, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.pos = nn.Embedding(1024, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 4, 4 * d_model, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 256)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x, y = ids[:, :-1], ids[:, 1:]
        n = x.shape[1]
        h = self.embed(x) + self.pos(torch.arange(n, device=x.device))
        causal = nn.Transformer.generate_square_subsequent_mask(n, device=x.device)
        h = self.encoder(h, mask=causal, is_causal=True)
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), y.flatten())


def python_bytes(limit: int) -> torch.Tensor:
    out = bytearray()
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        out += f.read_bytes()
        if len(out) >= limit:
            break
    return torch.tensor(list(out[:limit]), dtype=torch.long)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--budget", default=None, help="step budget (default: 80%% of the unplanned peak)")
    parser.add_argument("--fewbit", action="store_true")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    d_model, layers, steps, batch = (16, 2, 3, 2) if args.tiny else (128, 4, args.steps, 8)
    lengths = (48, 16, 32) if args.tiny else (512, 128, 256)
    torch.manual_seed(0)
    model = ByteLM(d_model, layers)
    if args.fewbit:
        print(tightfit.convert_(model, tightfit.FewBit(bits=2)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = python_bytes(100_000)
    batches = [
        torch.stack(
            [data[(s * batch + r) * 97 : (s * batch + r) * 97 + lengths[s % 3]] for r in range(batch)]
        )
        for s in range(steps)
    ]
    budget = args.budget
    if budget is None:
        with torch.random.fork_rng():
            probe = copy.deepcopy(model)
            peak = tightfit.profile(
                probe, batches[0], optimizer=torch.optim.AdamW(probe.parameters()), time_steps=0
            ).peak_bytes
        budget = int(0.8 * peak)
    config = tightfit.RematConfig(op_level=False, segments=False, options=()) if args.tiny else None
    hook = attach(model, budget, optimizer=opt, config=config)  # the one line
    meter = StepMeter()
    hook.meter = meter  # record each step's peak with the ruler (planning left out)
    model.train()
    losses = []
    for ids in batches:  # the loop, unchanged
        meter.start([model, opt, ids])
        opt.zero_grad(set_to_none=True)
        loss = model(ids)
        loss.backward()
        opt.step()
        meter.stop()
        losses.append(loss.item())
    print(hook.plans)
    result = {
        "budget": int(tightfit.parse_size(budget)),
        "highest_step_peak": max(meter.peaks),
        "losses": losses,
        "plans": len(hook.plans.plans),
    }
    print(
        f"budget {tightfit.format_size(result['budget'])}, highest step peak "
        f"{tightfit.format_size(result['highest_step_peak'])}, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )
    hook.remove()
    return result


if __name__ == "__main__":
    main()
