"""Device check of the Hugging Face callback: mixed precision on an accelerator (fp16 with its grad scaler,
bf16), losses equal to the same Trainer run without tightfit and every step within the budget.

    python -m benchmarks.integrations.device_check            # CUDA when present: bf16 and fp16; CPU: bf16

A tiny random-init BERT (examples/hf_trainer_minilm.py --tiny data: three sequence lengths, dynamic
padding) trains 4 optimizer steps with gradient accumulation 2. The budget is the unplanned step's ruler
peak on the longest batch (under the run's autocast) times 0.9 plus the gradient bytes the callback
reserves. Prints one line per precision and exits non-zero when a check fails; writes
``results/latest/<--results>.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from typing import Any

import torch

from benchmarks.common import results
from examples.hf_trainer_minilm import pad_collate, tiny_data
from tightfit.integrations.hf import TightfitCallback
from tightfit.integrations.hook import grad_bytes
from tightfit.memory import profile
from tightfit.remat.config import RematConfig


def _losses(precision: str, device: str, callbacks: list[Any]) -> list[torch.Tensor]:
    from transformers import Trainer, TrainingArguments

    class Recording(Trainer):
        losses: list[torch.Tensor] = []

        def _get_train_sampler(self, *a: Any, **k: Any) -> Any:
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                self.losses.append(out.detach().float().cpu().clone())
            return out

    model, train, _ = tiny_data()
    trainer = Recording(
        model=model,
        args=TrainingArguments(
            output_dir=tempfile.mkdtemp(),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=4,
            learning_rate=1e-3,
            save_strategy="no",
            report_to=[],
            use_cpu=device == "cpu",
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            seed=0,
            disable_tqdm=True,
        ),
        train_dataset=train,
        data_collator=pad_collate,
        callbacks=callbacks,
    )
    trainer.losses = []
    trainer.train()
    return trainer.losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="hf_device_check")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precisions = ["bf16", "fp16"] if device == "cuda" else ["bf16"]
    rows, ok = [], True
    for precision in precisions:
        model, train, _ = tiny_data()
        longest = pad_collate([train[i] for i in range(2)])  # the first batch is the longest
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        with torch.random.fork_rng(), torch.autocast(device, dtype=dtype):
            m = copy.deepcopy(model).to(device).train()
            batch = {k: v.to(device) for k, v in longest.items()}
            peak = profile(m, batch, optimizer=torch.optim.AdamW(m.parameters()), time_steps=0).peak_bytes
        budget = grad_bytes(model) + int(0.9 * peak)
        plain = _losses(precision, device, [])
        callback = TightfitCallback(
            budget=budget, config=RematConfig(op_level=False, segments=False, options=()), measure=True
        )
        planned = _losses(precision, device, [callback])
        equal = len(plain) == len(planned) and all(torch.equal(x, y) for x, y in zip(plain, planned))
        within = max(callback.step_peaks) <= budget
        ok &= equal and within
        row = {
            "precision": precision,
            "device": device,
            "budget": budget,
            "step_peaks": callback.step_peaks,
            "losses_equal": equal,
            "within_budget": within,
            "plan": callback.plans.plans[0].plan.summary(),
        }
        rows.append(row)
        print(row)
    paths = results.write(a.results, {"rows": rows, "ok": ok}, device=device)
    results.say_written(paths)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
