"""Segments: runs of block calls checkpointed as one region driven by the user's forward. Gradients are
bit-identical (dropout, glue code between blocks, data-dependent control flow), only the segment's entry
stays alive, bad glue code is refused, the DP over segments is optimal, and the planner uses them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tightfit.memory import LiveTracker
from tightfit.remat import Planner, RematConfig, execute
from tightfit.remat.options import IN_SEGMENT, RECOMPUTE, STORE, Option, Segment, parse_option
from tightfit.remat.segments import SegmentError
from tightfit.testing import build, clone, grads_after_step, same_grads


class Cell(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * d, 4 * d)
        self.drop = nn.Dropout(0.3)
        self.calls = 0

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        a, b, c, d = self.drop(self.fc(torch.cat([x, h], -1))).chunk(4, -1)
        return torch.tanh(a) * torch.sigmoid(b) + torch.sin(c) * d


class Loop(nn.Module):
    """An RNN-like loop with glue between cell calls: slicing, a functional dropout, data-dependent
    control flow, and an in-place op on a tensor made inside the loop."""

    def __init__(self, d: int = 32, glue_mutates_input: bool = False) -> None:
        super().__init__()
        self.cell = Cell(d)
        self.d = d
        self.glue_mutates_input = glue_mutates_input

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        h = xs.new_zeros(xs.shape[0], self.d)
        outs = []
        for t in range(xs.shape[1]):
            x = xs[:, t]
            if self.glue_mutates_input:
                xs.mul_(1.0)  # mutates the segment's input: cannot be replayed
            h = self.cell(x, h)
            h = nn.functional.dropout(h, 0.2, self.training)
            h = h * 2 if h.sum() > 0 else h - 1  # which branch ran depends on the data
            h.add_(0.5)  # in place on a tensor made in the segment: replayed in order
            outs.append(h)
        return torch.stack(outs, 1).square().mean()


def _xs(t: int = 12) -> torch.Tensor:
    return torch.randn(4, t, 32)


def _segments(calls: int, length: int) -> list[Option]:
    out = []
    for start in range(0, calls, length):
        n = min(length, calls - start)
        out += [RECOMPUTE] if n == 1 else [Segment(n)] + [IN_SEGMENT] * (n - 1)
    return out


@pytest.mark.parametrize("length", [2, 5, 12])
def test_segments_give_identical_gradients_with_dropout_and_glue(length: int) -> None:
    model, xs = Loop().train(), _xs()
    reference = grads_after_step(clone(model), xs)
    execute.apply(model, {"cell": _segments(12, length)})
    for _ in range(2):  # the region state is reset between forwards
        model.cell.calls = 0
        assert same_grads(reference, grads_after_step(model, xs))
        assert model.cell.calls == 24  # every cell call recomputed once, segment by segment


def _live_after_forward(model: nn.Module, xs: torch.Tensor) -> int:
    model.zero_grad(set_to_none=True)
    with LiveTracker(track=[model, xs]) as t:
        loss = model(xs)
        live = t.current
        loss.backward()
    return live


def test_a_segment_keeps_less_than_per_call_checkpoints() -> None:
    # 256 wide: a call's tensors outweigh the CPU RNG state each checkpoint region stashes (5 KiB)
    model, xs = Loop(d=256).train(), torch.randn(4, 16, 256)
    stored = _live_after_forward(model, xs)
    execute.apply(model, {"cell": [RECOMPUTE] * 16})
    per_call = _live_after_forward(model, xs)
    execute.apply(model, {"cell": _segments(16, 16)})
    segment = _live_after_forward(model, xs)
    assert segment < per_call < stored


def test_glue_that_mutates_a_segment_input_is_refused_and_leaves_no_hooks() -> None:
    model, xs = Loop(glue_mutates_input=True).train(), _xs()
    execute.apply(model, {"cell": _segments(12, 4)})
    with pytest.raises(SegmentError, match="in place"):
        model(xs)
    model.glue_mutates_input = False
    reference = grads_after_step(clone(execute.undo(clone(model))), xs)
    assert same_grads(reference, grads_after_step(model, xs))  # checkpoint's hooks were popped


def test_an_exception_inside_a_segment_closes_it() -> None:
    model, xs = Loop().train(), _xs()
    execute.apply(model, {"cell": _segments(12, 6)})
    with pytest.raises(RuntimeError):
        model(xs[:, :, :5])  # wrong width: the first cell call fails inside the open region
    reference = grads_after_step(clone(execute.undo(clone(model))), xs)
    assert same_grads(reference, grads_after_step(model, xs))


def test_eval_no_grad_and_compile_fallback() -> None:
    model, xs = Loop().train(), _xs()
    reference = grads_after_step(clone(model), xs)
    execute.apply(model, {"cell": _segments(12, 4)})
    with torch.no_grad():
        model(xs)
    assert model.cell.calls == 12
    model.cell.calls = 0
    compiled = torch.compile(model, backend="aot_eager")
    assert same_grads(reference, grads_after_step(compiled, xs))  # per-call checkpoints when compiled


def test_bad_segment_options() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        Segment(1)
    with pytest.raises(ValueError, match="malformed"):
        parse_option("segment:x")
    with pytest.raises(ValueError, match="malformed"):
        execute.apply(Loop(), {"cell": ["segment:1"]})
    with pytest.raises(ValueError, match="cannot be the default"):
        execute.apply(Loop(), {"cell": [STORE]}, default=Segment(2))
    assert parse_option("segment:4") == Segment(4) and Segment(4).label == "segment of 4"


# -- the planner -----------------------------------------------------------------------------------
def test_planner_uses_segments_to_go_below_per_block_checkpointing() -> None:
    model, batch = build("lstm-tiny", hidden_size=48, embed_dim=48)
    reference = grads_after_step(clone(model), batch)
    per_block = Planner(clone(model), batch, config=RematConfig(segments=False, op_level=False))
    planner = Planner(model, batch, config=RematConfig(op_level=False))
    assert planner.min_budget < per_block.min_budget
    plan = planner.plan(planner.min_budget)
    assert any(isinstance(d.option, Segment) for d in plan.decisions)
    assert "segment of" in str(plan)
    planner.apply(plan)
    assert same_grads(reference, grads_after_step(model, batch))


def test_regions_are_freed_without_the_garbage_collector() -> None:
    import gc
    import weakref

    from tightfit.remat import segments

    model, xs = Loop().train(), _xs()
    execute.apply(model, {"cell": _segments(12, 4)})
    regions: list[weakref.ref] = []
    original = segments.Region.__init__

    def spy(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        original(self, *args, **kwargs)
        regions.append(weakref.ref(self))

    gc.disable()
    try:
        segments.Region.__init__ = spy  # type: ignore[method-assign]
        loss = model(xs)
        assert len(regions) == 3 and all(r() is not None for r in regions)  # held by the autograd graph
        loss.backward()
        del loss
        assert all(r() is None for r in regions)  # no reference cycle keeps the segment inputs alive
    finally:
        segments.Region.__init__ = original  # type: ignore[method-assign]
        gc.enable()


class _GcSpy(Cell):
    """A cell that records whether the garbage collector was enabled each time it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled: list[bool] = []
        self.interrupt = False

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        import gc

        self.enabled.append(gc.isenabled())
        if self.interrupt:
            raise KeyboardInterrupt
        return super().forward(x, h)


@pytest.mark.parametrize("plan", ["segments", "per-call"])
def test_the_collector_is_paused_while_checkpointed_code_runs_and_resumed(plan: str) -> None:
    """Training forward (and a segment's recompute): paused. Afterwards, after a forward that raised,
    under no_grad and when the user had paused it: as it was; after a KeyboardInterrupt (no forward hook
    runs): resumed at the next forward. Gradients stay identical."""
    import gc

    model, xs = Loop().train(), _xs()
    model.cell = _GcSpy()
    reference = grads_after_step(clone(model), xs)
    execute.apply(model, {"cell": _segments(12, 4) if plan == "segments" else [RECOMPUTE] * 12})
    cell = model.cell
    assert gc.isenabled()
    loss = model(xs)
    assert cell.enabled == [False] * 12 and gc.isenabled()  # resumed when the forward returned
    loss.backward()
    if plan == "segments":  # the segment's replay pauses it; a per-call recompute runs torch's own code
        assert cell.enabled[12:] == [False] * 12
    assert gc.isenabled()
    assert same_grads(reference, grads_after_step(model, xs))

    cell.enabled.clear()
    with pytest.raises(RuntimeError, match="shape"):
        model(torch.randn(4, 12, 7))  # the cell's matmul fails inside the forward
    assert gc.isenabled()
    with torch.no_grad():
        model(xs)
    assert cell.enabled[-12:] == [True] * 12
    try:
        cell.interrupt = True  # forward hooks do not run on a KeyboardInterrupt: resumed at the next forward
        with pytest.raises(KeyboardInterrupt):
            model(xs)
        cell.interrupt = False
        assert not gc.isenabled()
        model(xs).backward()
        assert gc.isenabled()
        gc.disable()
        model(xs).backward()
        assert not gc.isenabled()  # the user's choice is left alone
    finally:
        gc.enable()


def test_recorded_arguments_round_trip_on_the_fast_path_and_through_pytree() -> None:
    """What a segment records of a call's arguments rebuilds the same call: flat and (x, (h, c)) arguments
    take the fast path, nested containers and keyword arguments go through torch's pytree."""
    import torch.utils._pytree as pytree

    from tightfit.remat.segments import _flatten, _unflatten

    x, h, c = torch.randn(3), torch.randn(3), torch.randn(3)
    calls = [
        ((x,), {}, True),
        ((x, (h, c)), {}, True),
        ((x, slice(None), 2), {}, True),
        ((x, (h, [c])), {}, False),  # a list inside a tuple
        ((x, [h, c]), {}, False),
        ((x, {"h": h}), {}, False),
        ((x,), {"h": h}, False),
    ]
    for args, kwargs, fast in calls:
        leaves, spec = _flatten(args, kwargs)
        assert isinstance(spec, tuple) == fast, (args, kwargs)
        expected = pytree.tree_leaves((args, kwargs))
        assert len(leaves) == len(expected) and all(p is q for p, q in zip(leaves, expected))
        rebuilt, expected_spec = pytree.tree_flatten(_unflatten(leaves, spec))
        assert expected_spec == pytree.tree_flatten((args, kwargs))[1]
        assert all(p is q for p, q in zip(rebuilt, expected))
