"""Lightning + tightfit: a torch ``nn.TransformerEncoder`` classifier trained within a memory budget.

    python examples/lightning_encoder.py --tiny                   # seconds, synthetic data
    python examples/lightning_encoder.py --budget 40MiB --fewbit  # larger model, few-bit GELU too

The data is synthetic and dynamically padded (every batch padded to its own longest sequence), so the
callback sees several batch shapes: it plans on the first batch and re-plans when a longer one arrives.
``--fewbit`` first converts the encoder layers' GELU (held by torch as a function attribute) to a 2-bit
backward with ``tightfit.convert_`` (lossy); recomputation is lossless.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import nn

import tightfit
from tightfit.integrations.lightning import TightfitCallback


class EncoderClassifier(pl.LightningModule):
    """Embedding -> nn.TransformerEncoder (GELU) -> mean pool -> 3 classes; records its training losses."""

    def __init__(self, d_model: int = 128, layers: int = 4, vocab: int = 64, lr: float = 1e-3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 4, 4 * d_model, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 3)
        self.lr = lr
        self.losses: list[torch.Tensor] = []

    def loss(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        ids, labels = batch
        h = self.encoder(self.embed(ids), src_key_padding_mask=ids == 0)
        return nn.functional.cross_entropy(self.head(h.mean(dim=1)), labels)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def on_train_batch_end(self, outputs: dict[str, torch.Tensor], batch: object, batch_idx: int) -> None:
        # recorded here, not in training_step: the planner runs training_step a few times while planning
        self.losses.append(outputs["loss"].detach().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def make_loader(
    n: int = 256, lengths: Sequence[int] = (128, 32, 64), vocab: int = 64, batch: int = 2
) -> torch.utils.data.DataLoader:
    """Synthetic token sequences (lengths cycling through ``lengths``, one length per batch of ``batch``),
    label = (sum of tokens) mod 3; padded per batch with token 0."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        length = lengths[(i // batch) % len(lengths)]
        ids = torch.randint(1, vocab, (length,), generator=g)
        items.append((ids, int(ids.sum()) % 3))

    def collate(rows: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = nn.utils.rnn.pad_sequence([r[0] for r in rows], batch_first=True)
        return ids, torch.tensor([r[1] for r in rows])

    return torch.utils.data.DataLoader(items, batch_size=batch, shuffle=False, collate_fn=collate)


def main(argv: Sequence[str] | None = None) -> EncoderClassifier:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and 4 steps (the test suite)")
    parser.add_argument("--budget", default=None, help="step budget (default: 85%% of the unplanned peak)")
    parser.add_argument("--fewbit", action="store_true", help="also 2-bit GELU backward (lossy)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    d_model, layers, steps = (32, 2, 4) if args.tiny else (128, 4, args.steps or 50)
    torch.manual_seed(0)
    module = EncoderClassifier(d_model=d_model, layers=layers)
    if args.fewbit:
        tightfit.convert_(module, tightfit.FewBit(bits=2))
    loader = make_loader(n=8 * steps, lengths=(24, 8, 16) if args.tiny else (128, 32, 64))
    budget = args.budget
    if budget is None:  # 85% of one unplanned step on the longest batch, measured by the ruler
        batch = next(iter(loader))
        with torch.random.fork_rng():
            import copy

            probe = copy.deepcopy(module)
            report = tightfit.profile(
                _Loss(probe), (batch,), optimizer=torch.optim.AdamW(probe.parameters()), time_steps=0
            )
        budget = int(0.85 * report.peak_bytes)
    fast = tightfit.RematConfig(op_level=False, segments=False, options=()) if args.tiny else None
    callback = TightfitCallback(budget=budget, config=fast, measure=True)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, loader)
    peak = max(callback.step_peaks)
    print(
        f"budget {tightfit.format_size(int(tightfit.parse_size(budget)))}, highest step peak "
        f"{tightfit.format_size(peak)}, final loss {float(module.losses[-1]):.4f}"
    )
    print(callback.plans)
    return module


class _Loss(nn.Module):
    def __init__(self, module: EncoderClassifier) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.module.loss(batch)


if __name__ == "__main__":
    main()
