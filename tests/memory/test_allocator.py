"""The allocator's peak (no dispatch mode) against known allocations, and the ruler as its upper bound."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tightfit.memory import LiveTracker
from tightfit.memory.allocator import allocator_peak
from tightfit.remat import execute
from tightfit.remat.blocks import find_blocks
from tightfit.remat.chain import options_by_module


def test_cpu_peak_of_known_allocations_is_exact() -> None:
    kept: list[torch.Tensor] = []

    def fn() -> None:
        a = torch.empty(1000, dtype=torch.uint8)
        kept.append(torch.empty(3000, dtype=torch.uint8))
        del a
        kept.append(torch.empty(500, dtype=torch.uint8))

    assert allocator_peak(fn) == 4000  # a + the first kept one, before a is freed
    assert allocator_peak(lambda: None) == 0


def test_other_devices_are_refused() -> None:
    with pytest.raises(ValueError, match="CPU or CUDA"):
        allocator_peak(lambda: None, "meta")


class _Noop(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        return func(*args, **(kwargs or {}))


def test_observing_a_segmented_rnn_step_raises_its_peak_and_the_ruler_counts_the_observed_step() -> None:
    """Under any Python dispatch mode autograd accumulates some of an RNN's per-step gradients out of place
    (module docstring of tightfit.memory.allocator). Without remat all three readings agree to the byte;
    with 64-block segments the plain step peaks lower than the observed one, which the ruler measures to the
    byte, checkpoint's stash of the CPU RNG state per region included (NOTE in tightfit.memory.live)."""
    import tightfit.zoo as zoo

    model_factory, batch_factory = zoo.get("lstm")
    torch.manual_seed(0)
    model = model_factory(vocab_size=64, embed_dim=64, hidden_size=512, num_layers=2).train()
    batch = batch_factory(batch_size=8, seq_len=100, vocab_size=64)

    def step() -> None:
        model(**batch).backward()

    def readings() -> tuple[int, int, int]:
        _zero_grads(model)
        plain = allocator_peak(step)
        _zero_grads(model)
        with_mode = allocator_peak(lambda: _run_under(_Noop(), step))
        _zero_grads(model)
        with LiveTracker(track=[model, batch]) as tracker:
            step()
        return plain, with_mode, tracker.peak - tracker.baseline

    step()  # one-time allocations (first calls of the kernels) out of the way
    plain, with_mode, ruler = readings()
    assert plain == with_mode == ruler
    blocks = find_blocks(model, batch, None).blocks
    plan = ["store", "store"]  # options by their JSON keys, as a saved plan holds them
    while len(plan) + 64 < len(blocks):
        plan += ["segment:64"] + ["in-segment"] * 63
    plan += ["store"] * (len(blocks) - len(plan))
    execute.apply(model, options_by_module(blocks, plan))
    try:
        plain, with_mode, ruler = readings()
    finally:
        execute.undo(model)
    assert ruler == with_mode  # the ruler counts the observed step, checkpoint's RNG stashes included
    assert plain + (1 << 20) < with_mode  # observing costs more than a MiB here (3.4 MiB, 14%)


def _zero_grads(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _run_under(mode: TorchDispatchMode, fn) -> None:  # noqa: ANN001
    with mode:
        fn()
