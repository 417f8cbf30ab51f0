"""What blocks and glue code read of earlier tensors, and what a segment therefore holds: an LSTM's
``torch.stack`` of its per-step outputs before the head, inside a segment ending at the head, holds the
outputs of every earlier step."""

from __future__ import annotations

import torch

from tightfit import zoo
from tightfit.remat import Planner, RematConfig
from tightfit.remat.blocks import find_blocks
from tightfit.remat.options import IN_SEGMENT, RECOMPUTE, STORE, Segment
from tightfit.remat.reads import record_reads
from tightfit.remat.solvers.chain_costs import ChainCosts
from tightfit.testing import build


def test_the_glue_before_the_head_reads_every_step_output_last() -> None:
    model, batch = build("lstm-tiny")
    blocks = find_blocks(model, batch).blocks
    reads = record_reads(model, batch, blocks)
    names = [b.name for b in blocks]
    assert len(reads) == 2 * len(blocks) + 1
    b, t = batch["x"].shape
    h = model.config.hidden_size
    head = names.index("head")
    stack = reads[2 * head]  # the glue between the last block of the last step and the head
    tops = [2 * k + 1 for k, n in enumerate(names) if n.startswith("rnn.dropout[") and int(n[12:-1]) % 2]
    assert sorted(r.made for r in stack) == tops  # layer 1's output after dropout, of every step
    assert all(r.nbytes == 4 * b * h and r.last == 2 * head for r in stack)
    (logits,) = [r for r in reads[2 * head + 2] if r.made == 2 * head + 1]  # the loss reads the logits
    assert logits.nbytes == 4 * b * t * model.config.vocab_size
    # every step's slice xs[:, t] reads the embedding's dropout output, and so does the layer-0 cell
    # given the slice (a view: same storage); the last read is the last step's layer-0 cell
    embedded = 2 * names.index("dropout") + 1
    slices = [time for time in range(0, len(reads), 2) if any(r.made == embedded for r in reads[time])]
    assert len(slices) == t
    last_cell = 2 * names.index(f"rnn.cells.0[{t - 1}]") + 1
    assert {r.last for time in slices for r in reads[time] if r.made == embedded} == {last_cell}
    assert embedded in {r.made for r in reads[last_cell]}


def test_a_segment_ending_at_the_head_holds_the_earlier_step_outputs() -> None:
    model, batch = build("lstm-tiny")
    blocks = find_blocks(model, batch).blocks
    reads = record_reads(model, batch, blocks)
    b, t = batch["x"].shape
    h = model.config.hidden_size
    n = len(blocks)
    chain = ChainCosts([{}] * n, [0] * n, 1.0, reads=reads)
    per_step = 4  # blocks per time step: two cells, two dropouts
    state = 2 * 4 * b * h  # layer 1's (h, c) from the step before, read by the segment's layer-1 cell
    for steps in (1, 3):
        start = n - 1 - per_step * steps  # the segment: the last `steps` time steps and the head
        # the outputs of the steps before it (the embedding output, which later steps' slices read, is
        # the storage of the first cell's argument: in that block's own keep)
        assert chain._entering(start, n) == (t - steps) * 4 * b * h + state
    assert chain._entering(n - 1 - per_step, n - 1) == state  # stopping before the head


def test_the_planner_predicts_a_segment_over_the_head_at_or_above_its_measured_peak() -> None:
    torch.manual_seed(0)
    model_factory, batch_factory = zoo.get("lstm")
    model = model_factory(vocab_size=64, embed_dim=32, hidden_size=256, num_layers=2).train()
    batch = batch_factory(batch_size=8, seq_len=200, vocab_size=64)
    planner = Planner(model, batch, config=RematConfig(keep_output=False, op_level=False))
    n = len(planner.blocks.blocks)
    tail = 41  # ten time steps and the head
    plan = [STORE, STORE]
    while len(plan) + 40 <= n - tail:
        plan += [Segment(40)] + [IN_SEGMENT] * 39
    plan += [RECOMPUTE] * (n - tail - len(plan)) + [Segment(tail)] + [IN_SEGMENT] * (tail - 1)
    measured = planner.measured.verifier.peak(plan)
    held = planner.chain._entering(n - tail, n)
    assert held >= 190 * 4 * 8 * 256  # the outputs of the 190 steps before the segment
    assert planner.chain.peak(plan) >= measured
