"""TightfitCallback on a real Hugging Face Trainer: dynamic padding, accumulation, evaluation, resume."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Trainer, TrainingArguments  # noqa: E402

from tests.integrations._tiny import FAST, LENGTHS, PaddedDataset, pad_collate, step_peak, tiny_bert  # noqa: E402
from tightfit.errors import UserError  # noqa: E402
from tightfit.integrations.hf import PLANS_FILE, TightfitCallback  # noqa: E402
from tightfit.integrations.hook import grad_bytes  # noqa: E402


class RecordingTrainer(Trainer):
    """Records every training micro-batch's loss and batch shape; samples in dataset order."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.losses: list[torch.Tensor] = []
        self.lengths: list[int] = []

    def _get_train_sampler(self, *a, **k):
        return torch.utils.data.SequentialSampler(self.train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.losses.append(out.detach().clone())
            self.lengths.append(inputs["input_ids"].shape[1])
        return out


def _args(out, **kw):
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=1e-3,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


GROWING = (8, 16, 24)  # a longer batch arrives later: re-planned inside the Trainer's forward


def _run(out, callbacks=(), resume=None, lengths=LENGTHS, **kw):
    trainer = RecordingTrainer(
        model=tiny_bert(),
        args=_args(out, **kw),
        train_dataset=PaddedDataset(16, lengths=lengths),
        eval_dataset=PaddedDataset(4, lengths=lengths, seed=1),
        data_collator=pad_collate,
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model = tiny_bert()
    largest = pad_collate(PaddedDataset(2, lengths=(max(GROWING),)).items)
    reserve = grad_bytes(model)
    budget = reserve + int(0.9 * step_peak(model, largest))  # below the no-remat peak: plans recompute
    plain = _run(tmp_path_factory.mktemp("plain"), lengths=GROWING)
    callback = TightfitCallback(budget=budget, config=FAST, measure=True)
    out = tmp_path_factory.mktemp("planned")
    planned = _run(out, [callback], lengths=GROWING)
    resumed_cb = TightfitCallback(budget=budget, config=FAST)
    resumed = _run(out, [resumed_cb], resume=str(out / "checkpoint-2"), lengths=GROWING)
    return dict(
        budget=budget, plain=plain, planned=planned, cb=callback, resumed=resumed, resumed_cb=resumed_cb
    )


def test_losses_equal_and_every_step_within_budget(runs):
    plain, planned, cb = runs["plain"], runs["planned"], runs["cb"]
    assert planned.lengths[:3] == list(GROWING)  # dynamic padding: each batch longer than the last
    assert len(plain.losses) == len(planned.losses) == 8  # 4 steps x accumulation 2
    assert all(torch.equal(a, b) for a, b in zip(plain.losses, planned.losses))
    assert len(cb.step_peaks) == 4
    assert max(cb.step_peaks) <= runs["budget"], (cb.step_peaks, runs["budget"])
    plan = cb.plans.plans[-1].plan
    assert plan.checkpointed, "the budget is below the no-remat peak: something must be recomputed"
    # planned again on each longer batch (the second one mid-accumulation), shorter ones covered later
    assert cb.plans.planned == 3 and [p.key[0][1][1] for p in cb.plans.plans] == list(GROWING)
    assert planned.state.log_history and any("eval_loss" in h for h in planned.state.log_history)


def test_state_dict_keys_and_saved_plans(runs):
    planned = runs["planned"]
    assert list(planned.model.state_dict()) == list(tiny_bert().state_dict())
    assert planned.args.output_dir and (runs["planned"].args.output_dir)
    from pathlib import Path

    assert (Path(planned.args.output_dir) / "checkpoint-2" / PLANS_FILE).is_file()


def test_resume_reuses_the_plan_and_reproduces_the_losses(runs):
    planned, resumed, cb = runs["planned"], runs["resumed"], runs["resumed_cb"]
    assert cb.plans.planned == 0 and cb.plans.plans and cb.plans.plans[0].loaded
    assert len(resumed.losses) == 4  # steps 3 and 4
    assert all(torch.equal(a, b) for a, b in zip(planned.losses[4:], resumed.losses))


def test_hf_gradient_checkpointing_is_replaced_or_refused(tmp_path):
    model = tiny_bert()
    model.activation_checkpointing_enable()
    callback = TightfitCallback(budget="1GiB", hf_checkpointing="error")
    args = _args(tmp_path)
    with pytest.raises(UserError, match="gradient_checkpointing=False"):
        callback.on_train_begin(args, None, None, model=model)
    callback = TightfitCallback(budget="1GiB")
    state = type("S", (), {"global_step": 0})()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.on_train_begin(args, state, None, model=model)
    assert not model.is_activation_checkpointing
    assert any("switched it off" in str(w.message) for w in caught)
    callback.on_train_end(args, state, None)


def test_bad_arguments_are_refused_early():
    with pytest.raises(UserError, match="allow must name"):
        TightfitCallback(budget="1GiB", allow=("recompute", "magic"))
    with pytest.raises(UserError, match="on_new_shape"):
        TightfitCallback(budget="1GiB", on_new_shape="sometimes")
    with pytest.raises(ValueError):
        TightfitCallback(budget="lots")


def test_bf16_autocast_plans_under_the_trainers_autocast(tmp_path):
    """bf16=True: the plan is measured through the model's autocast forward; losses equal, within budget."""
    model = tiny_bert()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peak = step_peak(model, pad_collate(PaddedDataset(2).items))
    budget = grad_bytes(model) + int(0.9 * peak)
    short = dict(bf16=True, max_steps=2, eval_strategy="no", save_strategy="no")
    plain = _run(tmp_path / "plain", **short)
    callback = TightfitCallback(budget=budget, config=FAST, measure=True)
    planned = _run(tmp_path / "planned", [callback], **short)
    assert len(planned.losses) == 4 and all(torch.equal(a, b) for a, b in zip(plain.losses, planned.losses))
    assert max(callback.step_peaks) <= budget


def test_resume_with_another_accumulation_plans_again(runs):
    """A checkpoint's plans were made with the gradient reserve of accumulation 2: resuming with
    accumulation 1 does not reuse them (another reserve); they are measured again."""
    out = runs["planned"].args.output_dir
    callback = TightfitCallback(budget=runs["budget"], config=FAST)
    state = type("S", (), {"global_step": 2})()
    callback.on_train_begin(_args(out, gradient_accumulation_steps=1), state, None, model=tiny_bert())
    assert callback.plans.reserve == 0 and not callback.plans.plans
    assert any("gradient reserve" in n for n in callback.notes)
    callback.on_train_end(None, state, None)
    again = TightfitCallback(budget=runs["budget"], config=FAST)  # the same setting: reused
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters())
    again.on_train_begin(_args(out), state, None, model=model, optimizer=optimizer)
    assert again.plans.plans and again.plans.plans[0].loaded, again.notes
    again.on_train_end(None, state, None)


def test_with_callback_removes_the_hook_when_train_raises(tmp_path):
    class Failing(Trainer):
        def compute_loss(self, *a, **k):
            raise RuntimeError("data error")

    def trainer(callback):
        return Failing(
            model=tiny_bert(),
            args=_args(tmp_path, eval_strategy="no", save_strategy="no"),
            train_dataset=PaddedDataset(4),
            data_collator=pad_collate,
            callbacks=[callback],
        )

    left = trainer(TightfitCallback(budget="1GiB"))
    with pytest.raises(RuntimeError, match="data error"):
        left.train()
    assert left.model._forward_pre_hooks  # no Trainer event after the exception: still attached
    callback = TightfitCallback(budget="1GiB")
    failing = trainer(callback)
    with pytest.raises(RuntimeError, match="data error"), callback:
        failing.train()
    assert not failing.model._forward_pre_hooks and callback.hook is None
