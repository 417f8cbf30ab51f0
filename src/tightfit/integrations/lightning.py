"""Lightning: one callback keeps every training step within a memory budget.

    trainer = pl.Trainer(..., callbacks=[TightfitCallback(budget="6GiB")])

``on_train_batch_start`` receives the batch before the step, so planning happens there, outside the
step: the step tightfit plans is the module's own ``training_step(batch, batch_idx)`` (its loss: the
returned tensor or ``["loss"]``), plus the optimizer's step when Lightning has one optimizer. While
planning, ``self.log``/``self.log_dict`` are silenced (planning steps are not training steps; other side
effects of ``training_step``, such as appending to a list, happen once per measured step), and the
model, optimizer, gradients and every RNG are restored, so training gives the results it would give
without tightfit (with recompute only, bit-identical). Batch shapes are handled as in
``tightfit.integrations.shapes`` (plans per shape, on-demand re-plan for a larger one); with
``accumulate_grad_batches`` > 1 the trainable gradients' bytes are reserved out of the budget.
Validation and test run the original code (plans act in train mode with autograd on).
Lightning calls ``training_step``, not the wrapper the plan is applied to, so the plan's per-step state
(call counters of blocks called several times a step, segments left open) is reset by hand
(``tightfit.remat.execute.reset_step``) before each step, before its backward, after it and on an
exception, and sketched layers' step clock ticked before each step (``tightfit.sketch.seeding.tick``:
every step draws a fresh sketch); the garbage collector is not paused during the step (as it is when
the planned model itself is called).

One process only: under a distributed strategy the module is wrapped before the first batch; plan each
rank before wrapping (``LightningModule.configure_model`` with ``tightfit.integrations.attach``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from tightfit.errors import LossError, UserError
from tightfit.integrations.hook import StepMeter, grad_bytes
from tightfit.integrations.shapes import ShapePlans, check_allow
from tightfit.remat import execute
from tightfit.remat.config import RematConfig
from tightfit.sketch import seeding as sketch_seeding

__all__ = ["TightfitCallback"]


class _TrainingStep(torch.nn.Module):
    """``module.training_step(batch, 0)`` as a forward returning the loss: what the planner measures.
    Holds the module as a child, so plans patch the module's own submodules."""

    def __init__(
        self, module: pl.LightningModule, loss_fn: Callable[[Any, Any], torch.Tensor] | None
    ) -> None:
        super().__init__()
        self.module = module
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        if self._loss_fn is not None:
            return self._loss_fn(self.module, batch)
        out = self.module.training_step(batch, 0)
        if isinstance(out, dict):
            out = out.get("loss")
        if not isinstance(out, torch.Tensor):
            raise LossError(
                "training_step returned no loss tensor (manual optimization?); pass "
                "TightfitCallback(loss_fn=lambda module, batch: <scalar loss>)"
            )
        return out


@contextlib.contextmanager
def _silenced(module: pl.LightningModule) -> Iterator[None]:
    module.__dict__["log"] = lambda *a, **k: None
    module.__dict__["log_dict"] = lambda *a, **k: None
    try:
        yield
    finally:
        module.__dict__.pop("log", None)
        module.__dict__.pop("log_dict", None)


class TightfitCallback(pl.Callback):
    """Keep each Lightning training step within ``budget`` (see the module docstring).

    ``allow``: techniques plans may use (``("recompute",)``, lossless, by default). ``loss_fn(module,
    batch)``: the loss when ``training_step`` does not return it. ``on_new_shape``: "replan", "warn" or
    "error". ``config``: a ``RematConfig``. ``measure``: record each step's ruler peak in ``step_peaks``.
    """

    def __init__(
        self,
        budget: int | float | str,
        *,
        allow: str | Sequence[str] = ("recompute",),
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        on_new_shape: str = "replan",
        config: RematConfig | None = None,
        measure: bool = False,
    ) -> None:
        self.budget = budget
        self.allow = check_allow(allow)
        self.loss_fn = loss_fn
        self.on_new_shape = on_new_shape
        self.config = config
        self.meter = StepMeter() if measure else None
        self.plans: ShapePlans | None = None
        ShapePlans(torch.nn.Identity(), budget, allow=self.allow, on_new_shape=on_new_shape)  # validate now

    @property
    def step_peaks(self) -> list[int]:
        return [] if self.meter is None else list(self.meter.peaks)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.world_size > 1:
            raise UserError(
                "the tightfit Lightning callback plans in one process; under a distributed strategy plan "
                "each rank in configure_model (tightfit.integrations.attach)"
            )
        if self.plans is None:
            optimizers = trainer.optimizers
            self.plans = ShapePlans(
                _TrainingStep(pl_module, self.loss_fn),
                self.budget,
                allow=self.allow,
                loss_fn=None,
                optimizer=optimizers[0] if len(optimizers) == 1 else None,
                config=self.config,
                on_new_shape=self.on_new_shape,
                reserve=grad_bytes(pl_module) if trainer.accumulate_grad_batches > 1 else 0,
            )
        with _silenced(pl_module):
            self.plans.prepare((batch,))
        # the plan is applied to the _TrainingStep wrapper, whose forward Lightning never calls: its root
        # hooks (per-step call counters, segments left open, the sketch seeds' step clock) run here
        execute.reset_step(self.plans.model, failed=True)
        sketch_seeding.tick(self.plans.model)
        if self.meter is not None:
            self.meter.start([pl_module, *trainer.optimizers, batch])

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if self.plans is not None:
            execute.reset_step(self.plans.model)  # the forward is over: a segment still open ends here

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.plans is not None:
            execute.reset_step(self.plans.model)
        if self.meter is not None and self.meter.running:
            self.meter.stop()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.plans is not None:
            execute.reset_step(self.plans.model, failed=True)
        if self.meter is not None and self.meter.running:
            self.meter.stop()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.meter is not None and self.meter.running:
            self.meter.stop()
