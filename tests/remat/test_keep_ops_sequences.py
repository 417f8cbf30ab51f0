"""Keep-ops options on a call that runs other ops than measured (NOTE [ Keep-ops on another op sequence ]):
transformers skips an all-ones attention mask, so a block can take a shorter path than the one its plan
was measured on. Such a call runs again under recompute (RNG and running statistics put back), warns
once, and its gradients stay exact; while a planner measures it raises instead."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from tightfit.memory import SavedTensorCounter
from tightfit.remat import execute
from tightfit.remat.blocks import find_blocks
from tightfit.remat.execute import OpSequenceError, OpSequenceWarning
from tightfit.remat.measure import op_options, record_units
from tightfit.remat.options import RECOMPUTE, KeepOps, Option, parse_option
from tightfit.testing import build, clone, grads_after_step, same_grads


class MaskedBlock(nn.Module):
    def __init__(self, d: int = 24) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.drop1 = nn.Dropout(0.2)
        self.drop2 = nn.Dropout(0.1)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.drop1(torch.nn.functional.gelu(self.fc1(self.norm(x))))
        scores = h @ h.transpose(-1, -2) / 8
        if mask is not None:  # the path transformers skips when the mask is all ones
            scores = scores + mask
        p = self.drop2(torch.softmax(scores, dim=-1))
        return x + self.fc2(p @ h)


class MaskedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MaskedBlock() for _ in range(3))
        self.head = nn.Linear(24, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for b in self.blocks:
            x = b(x, mask)
        return self.head(x).square().mean()


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch) -> None:
    monkeypatch.setattr(execute, "_WARNED", set())  # each test sees its own first warning


def _batches() -> tuple[dict, dict]:
    x = torch.randn(2, 10, 24)
    mask = torch.randn(2, 10, 10).clamp(max=0)  # an additive attention mask, fresh values
    return {"x": x, "mask": mask}, {"x": x}


def _measured() -> tuple[MaskedNet, dict, dict, list[KeepOps]]:
    model = MaskedNet().train()
    masked, unmasked = _batches()
    profile = record_units(find_blocks(model, masked).groups[0])
    options = op_options(profile)
    assert options
    return model, masked, unmasked, options


def _apply(model: nn.Module, option: Option) -> nn.Module:
    m = clone(model)
    execute.apply(m, {f"blocks.{i}": [option] for i in range(3)})
    return m


def _saved(model: nn.Module, batch: dict) -> int:
    with SavedTensorCounter(exclude=[model, *batch.values()]) as c:
        loss = model(**batch)
    del loss
    return c.bytes


def test_another_op_sequence_runs_under_recompute_warns_once_and_gradients_stay_exact() -> None:
    model, masked, unmasked, options = _measured()
    recomputed = _saved(_apply(model, RECOMPUTE), unmasked)
    for option in options:
        m = _apply(model, option)
        assert same_grads(grads_after_step(model, masked), grads_after_step(m, masked))  # measured path
        assert _saved(m, masked) > recomputed
        with pytest.warns(OpSequenceWarning, match="runs under recompute") as record:
            grads = grads_after_step(m, unmasked)  # three block calls on the shorter path
        assert len([w for w in record if issubclass(w.category, OpSequenceWarning)]) == 1
        assert same_grads(grads_after_step(model, unmasked), grads)  # dropout on: the RNG was put back
        with warnings.catch_warnings():
            warnings.simplefilter("error", OpSequenceWarning)  # once per block type, option and sequence
            assert same_grads(grads_after_step(model, unmasked), grads_after_step(m, unmasked))
            assert _saved(m, unmasked) == recomputed


def test_while_a_planner_measures_another_sequence_raises() -> None:
    model, _, unmasked, options = _measured()
    m = _apply(model, options[0])
    with execute.strict_op_sequences(), pytest.raises(OpSequenceError, match="ran other ops") as err:
        m(**unmasked)
    assert err.value.option == options[0]
    with pytest.warns(OpSequenceWarning):
        m(**unmasked)  # outside, it runs


def test_an_option_read_back_before_any_matching_call_is_checked_when_the_call_ends(monkeypatch) -> None:
    """A plan read from JSON in a fresh process knows the op count and digest only: a call on another
    path is found when it ends, and runs again."""
    model, masked, unmasked, options = _measured()
    monkeypatch.setattr(execute, "_SEQUENCES", {})
    m = _apply(model, parse_option(options[-1].key))
    with pytest.warns(OpSequenceWarning, match=r"ran \d+ ops where"):
        assert same_grads(grads_after_step(model, unmasked), grads_after_step(m, unmasked))
    assert not execute._SEQUENCES
    assert same_grads(grads_after_step(model, masked), grads_after_step(m, masked))
    assert execute._SEQUENCES  # a call on the measured path taught it the names


class NormedBlock(MaskedBlock):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(24)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        return super().forward(x, mask)


def test_a_call_run_again_updates_running_statistics_once() -> None:
    model = MaskedNet()
    model.blocks = nn.ModuleList(NormedBlock() for _ in range(3))
    model.train()
    masked, unmasked = _batches()
    options = op_options(record_units(find_blocks(model, masked).groups[0]))
    reference = clone(model)
    m = _apply(model, options[0])
    before = int(m.blocks[0].bn.num_batches_tracked)
    with pytest.warns(OpSequenceWarning):
        assert same_grads(grads_after_step(reference, unmasked), grads_after_step(m, unmasked))
    for a, b in zip(reference.buffers(), m.buffers()):
        assert torch.equal(a, b)
    assert int(m.blocks[0].bn.num_batches_tracked) == before + 1


def test_bert_planned_on_a_padded_batch_trains_on_one_without_padding() -> None:
    """transformers drops an attention mask that is all ones: BERT's layers then run fewer ops than
    on the padded batch their keep-ops options were measured on."""
    model, batch = build("bert-base-tiny")
    padded = {**batch, "attention_mask": batch["attention_mask"].clone()}
    padded["attention_mask"][:, -5:] = 0
    blocks = find_blocks(model, padded)
    options = op_options(record_units(blocks.groups[0]))
    assert options
    paths = [b.path for b in blocks.blocks if b.group == 0]
    assert len(paths) >= 2 and all(".layer." in p for p in paths)
    m = clone(model)
    execute.apply(m, {p: [options[0]] for p in paths})
    assert same_grads(grads_after_step(model, padded), grads_after_step(m, padded))
    with pytest.warns(OpSequenceWarning, match="BertLayer"):
        assert same_grads(grads_after_step(model, batch), grads_after_step(m, batch))


def test_each_other_sequence_warns_once() -> None:
    model, masked, unmasked, options = _measured()
    m = _apply(model, options[0])
    with pytest.warns(OpSequenceWarning):
        m(**unmasked)
    with pytest.warns(OpSequenceWarning), torch.autocast("cpu", dtype=torch.bfloat16):  # another path
        m(**masked)


class AllReduced(MaskedBlock):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        stats = x.detach().mean(dim=(0, 1))
        torch.distributed.all_reduce(stats)  # a collective before the masked path (as SyncBatchNorm's)
        return super().forward(x, mask)


def test_a_partial_forward_that_ran_collectives_raises() -> None:
    """A call that ran a collective before it left the measured ops is not run again (the other ranks
    would see the collective once): it raises, naming the way out."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = MaskedNet()
        model.blocks = nn.ModuleList(AllReduced() for _ in range(3))
        model.train()
        masked, unmasked = _batches()
        options = op_options(record_units(find_blocks(model, masked).groups[0]))
        m = _apply(model, options[0])
        assert same_grads(grads_after_step(model, masked), grads_after_step(m, masked))
        with pytest.raises(OpSequenceError, match="collectives"):
            m(**unmasked)
    finally:
        dist.destroy_process_group()


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = MaskedBlock()
        self.proj = nn.Linear(24, 24)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.inner(x, mask))


def test_a_keep_ops_block_nested_in_a_segment_member() -> None:
    """A segment's replay cannot hold a call run again: nested in a member, a keep-ops call on its
    measured ops runs as planned, one off them raises (planners measure every option they offer)."""
    _, masked, unmasked, options = _measured()  # the op sequence of a MaskedBlock on these shapes
    option = options[0]
    model = MaskedNet()
    model.blocks = nn.ModuleList(Outer() for _ in range(3))
    model.train()
    m = clone(model)
    execute.apply(m, {"blocks.0": ["segment:2"], "blocks.1": ["in-segment"], "blocks.1.inner": [option]})
    assert same_grads(grads_after_step(model, masked), grads_after_step(m, masked))
    assert same_grads(grads_after_step(model, masked), grads_after_step(m, masked))  # and again
    with pytest.raises(OpSequenceError, match="inside a checkpointed segment"):
        m(**unmasked)
    assert same_grads(grads_after_step(model, masked), grads_after_step(m, masked))  # nothing left open
