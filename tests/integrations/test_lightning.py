"""The Lightning callback: plans before the step, losses unchanged, every step within budget."""

from __future__ import annotations

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from examples.lightning_encoder import EncoderClassifier, make_loader  # noqa: E402
from tests.integrations._tiny import FAST, profile  # noqa: E402
from tightfit.integrations.lightning import TightfitCallback  # noqa: E402


def _fit(callbacks):
    torch.manual_seed(0)
    module = EncoderClassifier(d_model=32, layers=2)
    trainer = pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        deterministic=True,
    )
    trainer.fit(module, make_loader(n=16, lengths=(24, 8, 16), d_model=32))
    return module


def test_lightning_callback_keeps_losses_and_budget():
    torch.manual_seed(0)
    probe = EncoderClassifier(d_model=32, layers=2)
    x, y = next(iter(make_loader(n=2, lengths=(24,), d_model=32)))
    with torch.random.fork_rng():
        full = profile(
            _Step(probe), ((x, y),), optimizer=torch.optim.AdamW(probe.parameters(), lr=1e-3), time_steps=0
        ).peak_bytes
    budget = int(0.9 * full)
    plain = _fit([])
    callback = TightfitCallback(budget=budget, config=FAST, measure=True)
    planned = _fit([callback])
    assert plain.losses and len(plain.losses) == len(planned.losses) == 4
    assert all(torch.equal(a, b) for a, b in zip(plain.losses, planned.losses))
    assert callback.plans.plans[0].plan.checkpointed
    assert len(callback.step_peaks) == 4 and max(callback.step_peaks) <= budget, (callback.step_peaks, budget)


class _Step(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, batch):
        return self.module.loss(batch)
