"""Hugging Face ``Trainer``: one callback keeps every training step within a memory budget.

    trainer = Trainer(model, args, ..., callbacks=[TightfitCallback(budget="6GiB")])

What it does, and why this way:

- Planning needs a real batch, and no ``TrainerCallback`` event receives one: ``on_train_begin`` gets the
  model (in transformers 5.x after ``accelerator.prepare``), the optimizer and the dataloader, but
  iterating the dataloader there would consume random numbers and shift the data order. So
  ``on_train_begin`` attaches a forward pre-hook to the unwrapped model (``tightfit.integrations.hook``):
  the first training forward plans on its own batch (the call's keyword arguments, as the Trainer passes
  them), under the autocast that ``bf16=True``/``fp16=True`` set on the model's forward, with the
  Trainer's optimizer counted; planning restores the model, optimizer, gradients and every RNG, so the
  run is the one it would have been without tightfit (with recompute only, losses are bit-identical).
- Dynamic padding: each training forward checks the batch shape; a shape covered by a planned one runs
  that plan, a larger one is planned on demand (``on_new_shape``; ``tightfit.integrations.shapes``).
- Gradient accumulation: the trainable gradients' bytes are reserved out of the budget (a micro-batch
  accumulating into existing gradients holds them all through its backward).
- Evaluation runs the original code: plans act only in train mode with autograd on.
- Checkpoints: ``state_dict`` keys do not change (plans patch ``forward``s; conversions share
  parameters). ``on_save`` writes ``tightfit_plans.json`` into the checkpoint folder; when training
  resumes (``state.global_step > 0`` at ``on_train_begin``), the plans saved with that checkpoint
  (``output_dir/checkpoint-<step>``) are reused without measuring when they were made for the same
  budget, ``allow``, gradient reserve and model/config fingerprint, and measured again otherwise (a
  note in ``notes``). A checkpoint stored outside ``output_dir`` needs ``plans_file=``.
- Hugging Face's own gradient checkpointing (``activation_checkpointing=True``, its alias
  ``gradient_checkpointing=True``, or ``model.gradient_checkpointing_enable()``) recomputes every layer
  whatever the budget; with ``hf_checkpointing="replace"`` (default) it is switched off with a warning
  and tightfit's plan recomputes what the budget needs; ``"error"`` raises instead.
- peft: pass the ``PeftModel``; frozen base layers keep no input for a weight gradient, so
  ``allow=("recompute", "sketch")`` sketches LoRA's adapter layers only (the conversion report says so).
- One process only: under DDP/FSDP the model is wrapped before any callback runs, and planning inside a
  wrapped forward would run backward passes through its reducer; plan each rank before wrapping.

- A ``train()`` that raises: no Trainer event follows it, so the pre-hook stays on the model (and runs
  at its next training forward); ``with callback: trainer.train()`` removes it however ``train()``
  ends.

``measure=True`` records each optimizer step's live-tensor peak with the ruler in ``step_peaks`` (bytes;
planning left out); it slows steps (every op is observed).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from tightfit._step import LossFn
from tightfit.errors import UserError
from tightfit.integrations.hook import BudgetHook, StepMeter, grad_bytes
from tightfit.integrations.shapes import ShapePlans, check_allow
from tightfit.remat.config import RematConfig

__all__ = ["PLANS_FILE", "TightfitCallback"]

PLANS_FILE = "tightfit_plans.json"
HF_CHECKPOINTING = ("replace", "error")


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (which skips steps while
    accumulating, so a measured step would leave out the optimizer)."""
    while optimizer is not None and not type(optimizer).__module__.startswith("torch."):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


class TightfitCallback(TrainerCallback):
    """Keep each training step of a Hugging Face ``Trainer`` within ``budget`` (see the module docstring).

    ``budget``: bytes or a size (``"6GiB"``): the ruler's live-tensor peak of one training step; or
    ``"min"`` / ``"x1.2"``, resolved on each planned batch shape (``tightfit.integrations.shapes``).
    ``allow``: techniques plans may use; ``("recompute",)`` (default) is lossless. ``loss_fn(output)``
    when the model output holds no ``loss``. ``on_new_shape``: "replan", "warn" or "error" for a batch
    larger than every planned shape. ``hf_checkpointing``: "replace" or "error". ``plans_file``: saved
    plans to reuse. ``config``: a ``RematConfig``. ``measure``: record step peaks in ``step_peaks``.
    """

    def __init__(
        self,
        budget: int | float | str,
        *,
        allow: str | Sequence[str] = ("recompute",),
        loss_fn: LossFn | None = None,
        on_new_shape: str = "replan",
        hf_checkpointing: str = "replace",
        plans_file: str | os.PathLike[str] | None = None,
        config: RematConfig | None = None,
        measure: bool = False,
    ) -> None:
        if hf_checkpointing not in HF_CHECKPOINTING:
            raise UserError(f"hf_checkpointing must be one of {HF_CHECKPOINTING}, got {hf_checkpointing!r}")
        self.budget = budget
        self.allow = check_allow(allow)
        self.loss_fn = loss_fn
        self.on_new_shape = on_new_shape
        self.hf_checkpointing = hf_checkpointing
        self.plans_file = plans_file
        self.config = config
        self.meter = StepMeter() if measure else None
        self.plans: ShapePlans | None = None
        self.hook: BudgetHook | None = None
        self.notes: list[str] = []
        ShapePlans(torch.nn.Identity(), budget, allow=self.allow, on_new_shape=on_new_shape)  # validate now

    @property
    def step_peaks(self) -> list[int]:
        """Live-tensor peak (bytes) of every optimizer step so far (``measure=True``), planning left out."""
        return [] if self.meter is None else list(self.meter.peaks)

    # -- Trainer events ------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise UserError("TightfitCallback needs the model: the Trainer passes it to on_train_begin")
        if getattr(args, "world_size", 1) > 1:
            raise UserError(
                "TightfitCallback plans in one process; under DDP/FSDP the Trainer wraps the model before "
                "any callback runs. Plan each rank before wrapping (tightfit.integrations.attach)."
            )
        self._hf_checkpointing(args, model)
        optimizer = _unwrap_optimizer(kwargs.get("optimizer"))
        accumulation = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
        reserve = grad_bytes(model) if accumulation > 1 else 0
        stale = (
            self.plans is not None
            and self.plans.model is model
            and self.plans.budget is not None
            and self.plans.reserve != reserve
        )
        if stale:  # another gradient accumulation setting: the plans are measured again when needed
            self.plans.remove()
        if self.plans is None or self.plans.model is not model or stale:
            self.plans = ShapePlans(
                model,
                self.budget,
                allow=self.allow,
                loss_fn=self.loss_fn,
                optimizer=optimizer,
                config=self.config,
                on_new_shape=self.on_new_shape,
                reserve=reserve,
            )
        else:
            self.plans.optimizer = optimizer
        saved = self._saved_plans(args, state)
        if saved is not None:
            # plans_file= names the user's own choice: a budget/allow mismatch there is an error; the plans
            # of a checkpoint are reused when they fit (same budget, allow, reserve, model and config)
            if self.plans.load(saved, strict=self.plans_file is not None):
                self.notes.append(f"reused the plans saved in {saved}")
            else:
                self.notes.extend(self.plans.notes[-1:])
        if self.hook is None:
            self.hook = BudgetHook(model, self.plans, self.meter)

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.meter is not None:
            optimizer = self.plans.optimizer if self.plans is not None else None
            self.meter.start([model, optimizer])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.meter is not None and self.meter.running:
            self.meter.stop()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.plans is None or not self.plans.plans:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            self.plans.save(folder / PLANS_FILE)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.detach()

    def detach(self) -> None:
        """Remove the forward pre-hook from the model (the plan stays applied; a later ``train()``
        attaches again). ``on_train_end`` calls it; no Trainer event follows a ``train()`` that raises,
        so ``with callback: trainer.train()`` calls it however ``train()`` ends."""
        if self.meter is not None and self.meter.running:
            self.meter.stop()
        if self.hook is not None:
            self.hook.remove(undo=False)
            self.hook = None

    def __enter__(self) -> TightfitCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- helpers -------------------------------------------------------------------------------------
    def _saved_plans(self, args: Any, state: Any) -> Path | None:
        if self.plans_file is not None:
            path = Path(self.plans_file)
            if not path.is_file():
                raise UserError(f"plans_file {str(path)!r} does not exist")
            return path
        if state.global_step > 0:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / PLANS_FILE
            if path.is_file():
                return path
        return None

    def _hf_checkpointing(self, args: Any, model: Any) -> None:
        flag = "is_activation_checkpointing"
        if not hasattr(model, flag):
            flag = "is_gradient_checkpointing"  # transformers before the activation_checkpointing names
        on = bool(getattr(model, flag, False)) or any(
            bool(getattr(args, name, False))
            for name in ("activation_checkpointing", "gradient_checkpointing")
        )
        if not on:
            return
        what = (
            "Hugging Face gradient checkpointing is on (activation_checkpointing=True, "
            "gradient_checkpointing=True or model.gradient_checkpointing_enable()): it recomputes every "
            "layer whatever the budget"
        )
        if self.hf_checkpointing == "error":
            raise UserError(
                f"{what}; TightfitCallback plans recomputation itself. Set activation_checkpointing=False "
                "(gradient_checkpointing=False), or "
                "pass hf_checkpointing='replace' to let tightfit switch it off."
            )
        disable = getattr(model, "activation_checkpointing_disable", None) or getattr(
            model, "gradient_checkpointing_disable", None
        )
        if disable is None:
            raise UserError(f"{what}, and the model has no gradient_checkpointing_disable() to switch it off")
        disable()
        warnings.warn(
            f"tightfit: {what}; switched it off: tightfit's plan recomputes only what the budget needs "
            "(set gradient_checkpointing=False to silence this, or hf_checkpointing='error' to refuse)",
            stacklevel=2,
        )
        self.notes.append("switched off Hugging Face gradient checkpointing")
