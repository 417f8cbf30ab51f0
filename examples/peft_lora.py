"""peft LoRA + Hugging Face Trainer + tightfit: a small causal LM fine-tuned with adapters within a budget.

    python examples/peft_lora.py                                 # a 4-layer Llama on Python sources, CPU
    python examples/peft_lora.py --allow recompute,sketch        # also sketch the adapters' inputs (lossy)
    python examples/peft_lora.py --tiny                          # seconds (the test suite)

No pretrained causal LM ships in a package here, so the base model is a Llama built from a config
(random init, frozen as LoRA freezes it) and the text is the Python standard library's own sources, read
as bytes (vocabulary 256). What matters for memory is the same as with pretrained weights: the frozen base
layers keep no input for a weight gradient (``tightfit.convert_`` with ``Sketch`` skips them and says so),
their activations still flow back to the adapters, and recomputation plans which blocks to recompute.
"""

from __future__ import annotations

import argparse
import copy
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import tightfit
from tightfit.integrations.hf import TightfitCallback


def python_bytes(limit: int) -> torch.Tensor:
    """Up to ``limit`` bytes of the standard library's .py files (sorted, so the same every run)."""
    out = bytearray()
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        out += f.read_bytes()
        if len(out) >= limit:
            break
    return torch.tensor(list(out[:limit]), dtype=torch.long)


class Chunks(torch.utils.data.Dataset):
    """Byte sequences of cycling lengths (dynamic shapes); labels are the inputs (causal LM)."""

    def __init__(self, data: torch.Tensor, lengths: Sequence[int], n: int) -> None:
        self.items, pos = [], 0
        for i in range(n):
            length = lengths[(i // 2) % len(lengths)]
            if pos + length > len(data):
                pos = 0
            self.items.append(data[pos : pos + length])
            pos += length

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.items[i]}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad each batch to its longest row; padding is masked and ignored by the loss (-100)."""
    length = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, it in enumerate(items):
        ids[row, : len(it["input_ids"])] = it["input_ids"]
        mask[row, : len(it["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def lora_model(tiny: bool) -> torch.nn.Module:
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    size = (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        if tiny
        else (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4))
    )
    config = LlamaConfig(
        vocab_size=256,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        use_cache=False,
        **size,
    )
    base = LlamaForCausalLM(config)
    lora = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
    )
    return peft.get_peft_model(base, lora)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model, 4 steps")
    parser.add_argument("--budget", default=None, help="step budget (default: 80%% of the unplanned peak)")
    parser.add_argument("--allow", default="recompute", help="techniques, e.g. recompute,sketch")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--output-dir", default="/tmp/tightfit-peft")
    args = parser.parse_args(argv)
    lengths = (48, 16, 32) if args.tiny else (512, 128, 256)
    steps, batch = (4, 2) if args.tiny else (args.steps, args.batch)
    model = lora_model(args.tiny)
    train = Chunks(python_bytes(200_000), lengths, n=2 * steps * batch)
    budget = args.budget
    if budget is None:
        first = collate([train[i] for i in range(batch)])
        with torch.random.fork_rng():
            probe = copy.deepcopy(model).train()
            trainable = [p for p in probe.parameters() if p.requires_grad]
            peak = tightfit.profile(
                probe, first, optimizer=torch.optim.AdamW(trainable), time_steps=0
            ).peak_bytes
        budget = int(0.8 * peak)
    config = tightfit.RematConfig(op_level=False, segments=False, options=()) if args.tiny else None
    callback = TightfitCallback(budget=budget, allow=args.allow, config=config, measure=True)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=1e-3,
            save_strategy="no",
            logging_steps=max(1, steps // 10),
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            seed=0,
            disable_tqdm=True,
        ),
        train_dataset=train,
        data_collator=collate,
        callbacks=[callback],
    )
    out = trainer.train()
    result = {
        "budget": int(tightfit.parse_size(budget)),
        "highest_step_peak": max(callback.step_peaks),
        "train_loss": out.training_loss,
        "plans": len(callback.plans.plans),
    }
    print(callback.plans)
    print(
        f"budget {tightfit.format_size(result['budget'])}, highest step peak "
        f"{tightfit.format_size(result['highest_step_peak'])}, train loss {result['train_loss']:.4f}"
    )
    return result


if __name__ == "__main__":
    main()
