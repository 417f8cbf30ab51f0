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
    trainer.fit(module, make_loader(n=16, lengths=(24, 8, 16)))
    return module


def test_lightning_callback_keeps_losses_and_budget():
    torch.manual_seed(0)
    probe = EncoderClassifier(d_model=32, layers=2)
    x, y = next(iter(make_loader(n=2, lengths=(24,))))
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


class _Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.a, self.b = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(x)))


class _Twice(pl.LightningModule):
    """Each block called twice per step: its plan has one decision per call, counted per step."""

    def __init__(self, d=32):
        super().__init__()
        self.blk, self.blk2, self.head = _Block(d), _Block(d), torch.nn.Linear(d, 1)

    def loss(self, batch):
        (x,) = batch
        return self.head(self.blk(self.blk(self.blk2(self.blk2(x))))).pow(2).mean()

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_blocks_called_twice_per_step_stay_planned_every_step():
    """Lightning calls training_step, not the wrapper the plan patches: the per-call counters are reset
    each step by the callback, so every step (not only the first) runs the plan within budget."""
    from tightfit.remat import execute

    torch.manual_seed(0)
    data = [(torch.randn(128, 32),) for _ in range(3)]
    probe = _Twice()
    full = profile(
        _Step(probe), (data[0],), optimizer=torch.optim.SGD(probe.parameters(), lr=0.0), time_steps=0
    ).peak_bytes
    budget = int(0.85 * full)
    callback = TightfitCallback(budget=budget, config=FAST, measure=True)
    module = _Twice()
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    plan = execute.applied(callback.plans.model)
    assert any(len(options) == 2 for options in plan.values()), plan  # decisions per call: counted
    assert len(callback.step_peaks) == 3 and max(callback.step_peaks) <= budget, (callback.step_peaks, budget)


def test_sketch_clocks_tick_every_step(monkeypatch):
    """Lightning never calls the planned wrapper, whose pre-hook ticks sketched layers' step clock: the
    callback ticks it before each step, so every step draws a fresh sketch."""
    from tightfit.integrations import lightning

    ticked = []
    monkeypatch.setattr(lightning.sketch_seeding, "tick", lambda model: ticked.append(model) or 0)
    callback = TightfitCallback(budget=10 * 2**30, config=FAST)
    _fit([callback])
    assert len(ticked) == 4 and all(m is callback.plans.model for m in ticked)
