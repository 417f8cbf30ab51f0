"""Executing plans with torch.utils.checkpoint / selective-checkpoint policies: bit-identical gradients,
state_dict keys, undo, per-call decisions, batch-norm statistics, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tightfit.remat import execute
from tightfit.remat.options import RECOMPUTE, SAVE_LINEAR, SAVE_MATMUL, STORE, parse_option
from tightfit.testing import clone, grads_after_step, same_grads


class Block(nn.Module):
    def __init__(self, d: int = 24) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(4 * d, d)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.drop(torch.nn.functional.gelu(self.fc1(self.norm(x))))
        scores = torch.softmax(h @ h.transpose(-1, -2) / 8, dim=-1)
        return x + self.fc2(scores @ h)


class Net(nn.Module):
    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))
        self.bn = nn.BatchNorm1d(24)
        self.head = nn.Linear(24, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(self.bn(x.transpose(1, 2)).transpose(1, 2)).square().mean()


def _x() -> torch.Tensor:
    return torch.randn(2, 10, 24)


@pytest.mark.parametrize("option", [STORE, SAVE_MATMUL, SAVE_LINEAR, RECOMPUTE], ids=str)
def test_every_option_gives_identical_gradients_with_dropout(option: str) -> None:
    model, x = Net().train(), _x()
    reference = grads_after_step(clone(model), x)
    keys = list(model.state_dict())
    execute.apply(model, {f"blocks.{i}": [option] for i in range(3)})
    assert list(model.state_dict()) == keys
    assert same_grads(reference, grads_after_step(model, x))
    recomputes = model.blocks[0].calls
    assert recomputes == (1 if option == STORE else 2)  # one forward, plus one recompute when checkpointed


def test_undo_restores_the_original_forward_and_apply_replaces() -> None:
    model = Net()
    original = model.blocks[1].forward
    execute.apply(model, {"blocks.1": [RECOMPUTE]})
    assert "forward" in model.blocks[1].__dict__
    assert execute.applied(model) == {"blocks.1": [RECOMPUTE]}
    execute.apply(model, {"blocks.2": [SAVE_MATMUL]})
    assert "forward" not in model.blocks[1].__dict__
    execute.undo(model)
    assert execute.applied(model) == {} and "forward" not in model.blocks[2].__dict__
    assert model.blocks[1].forward == original
    execute.undo(model)  # a no-op


def test_per_call_decisions_for_a_module_called_in_a_loop() -> None:
    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = Block()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(4):
                x = self.cell(x)
            return x.square().mean()

    model, x = Loop().train(), _x()
    reference = grads_after_step(clone(model), x)
    execute.apply(model, {"cell": [RECOMPUTE, STORE, SAVE_LINEAR, STORE]})
    for _ in range(2):  # the per-call count restarts at every forward of the model
        model.cell.calls = 0
        assert same_grads(reference, grads_after_step(model, x))
        assert model.cell.calls == 4 + 2  # two of the four calls are recomputed


def test_recompute_leaves_batch_norm_statistics_as_without_remat() -> None:
    class BNBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.bn(self.conv(x)))

    class Mean(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.square().mean()

    model = nn.Sequential(BNBlock(), BNBlock(), Mean()).train()
    x = torch.randn(2, 3, 8, 8)
    ref = clone(model)
    reference = grads_after_step(ref, x)
    execute.apply(model, {"0": [RECOMPUTE], "1": [RECOMPUTE]})
    twin = copy.deepcopy(model)  # restores its own statistics when recomputing, not the original's
    untouched = [b.clone() for b in model.buffers()]
    assert same_grads(reference, grads_after_step(twin, x))
    for a, b, c in zip(ref.buffers(), twin.buffers(), model.buffers(), strict=True):
        assert torch.equal(a, b) and not (a.is_floating_point() and torch.equal(b, c))
    assert all(torch.equal(a, b) for a, b in zip(untouched, model.buffers()))
    assert same_grads(reference, grads_after_step(model, x))
    for a, b in zip(ref.buffers(), model.buffers()):
        assert torch.equal(a, b)


def test_eval_and_no_grad_do_not_checkpoint() -> None:
    model, x = Net(), _x()
    execute.apply(model, {"blocks.0": [RECOMPUTE]})
    model.eval()
    model(x).backward()
    assert model.blocks[0].calls == 1
    model.train()
    with torch.no_grad():
        model(x)
    assert model.blocks[0].calls == 2


def test_bad_input_is_rejected_before_patching() -> None:
    model = Net()
    with pytest.raises(KeyError, match="not submodules"):
        execute.apply(model, {"blocks.0": [RECOMPUTE], "nope": [RECOMPUTE]})
    with pytest.raises(ValueError, match="unknown remat option"):
        execute.apply(model, {"blocks.0": ["fast"]})
    with pytest.raises(TypeError, match="Option or its key"):
        execute.apply(model, {"blocks.0": [3]})
    assert execute.applied(model) == {} and "forward" not in model.blocks[0].__dict__


def test_json_keys_and_option_types_apply_alike() -> None:
    model = Net()
    execute.apply(model, {"blocks.0": ["recompute"], "blocks.1": ["save-matmul", "store"]})
    assert execute.applied(model) == {"blocks.0": [RECOMPUTE], "blocks.1": [SAVE_MATMUL, STORE]}
    assert execute.applied(model)["blocks.1"][0] == parse_option("save-matmul")


def test_a_deep_copy_of_a_patched_model_runs_its_own_parameters() -> None:

    model, x = Net().train(), _x()
    execute.apply(model, {"blocks.0": [RECOMPUTE], "blocks.1": [SAVE_MATMUL, STORE]})
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    reference = grads_after_step(clone_unpatched(twin), x)
    assert same_grads(reference, grads_after_step(twin, x))
    assert execute.applied(twin) == execute.applied(model)
    assert twin.blocks[0].calls == 2 and model.blocks[0].calls == 0


def clone_unpatched(model: nn.Module) -> nn.Module:

    return execute.undo(copy.deepcopy(model))


needs_region_budget = pytest.mark.skipif(
    not execute.compile_budget_supported(), reason="region_activation_memory_budget needs torch >= 2.13"
)


@needs_region_budget
def test_compile_budget_scopes_the_compilers_budget_to_the_patched_model() -> None:
    import torch._functorch.config as functorch_config

    from tightfit.testing import build, step_peak

    def compiled_peak(model: nn.Module, batch: dict) -> int:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        grads_after_step(compiled, batch)  # compiles
        return step_peak(compiled, batch)

    model, batch = build("gpt2-tiny", n_layer=2)
    default = compiled_peak(clone(model), batch)
    with functorch_config.patch(activation_memory_budget=0.5):
        global_half = compiled_peak(clone(model), batch)
    assert global_half < default  # the knob matters on this model
    patched = clone(model)
    execute.apply(patched, {}, compile_budget=0.5)
    assert compiled_peak(patched, batch) == global_half  # the same partition as the process-wide knob
    assert compiled_peak(clone_unpatched(patched), batch) == default  # an unpatched model is not affected
    eager_reference = grads_after_step(clone(model), batch)
    assert same_grads(eager_reference, grads_after_step(patched, batch))  # eager: no effect
    assert step_peak(patched, batch) == step_peak(model, batch)
    execute.undo(patched)
    assert "forward" not in patched.__dict__ and execute.applied_compile_budget(patched) is None
    torch._dynamo.reset()


def test_bad_compile_budget_is_rejected_before_patching() -> None:
    model = Net()
    for bad in (1.5, -0.1, True):
        with pytest.raises(ValueError, match="compile_budget"):
            execute.apply(model, {"blocks.0": [RECOMPUTE]}, compile_budget=bad)
    assert execute.applied(model) == {} and "forward" not in model.__dict__
    if execute.compile_budget_supported():
        execute.apply(model, {"blocks.0": [RECOMPUTE]}, compile_budget=0.5)
        assert execute.applied_compile_budget(model) == 0.5 and "forward" in model.__dict__
        execute.apply(model, {"blocks.0": [RECOMPUTE]})  # applying again replaces the budget too
        assert execute.applied_compile_budget(model) is None and "forward" not in model.__dict__


def test_a_planned_model_survives_torch_save_and_load(tmp_path) -> None:
    """``torch.save(model)`` pickles the patched forwards with the model; the loaded model runs its own
    plan (recomputes) with its own weights and gives the same gradients."""
    model, x = Net().train(), _x()
    reference = grads_after_step(clone(model), x)
    execute.apply(model, {"blocks.0": [RECOMPUTE], "blocks.1": ["segment:2"], "blocks.2": ["in-segment"]})
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert execute.applied(loaded) and loaded.blocks[0].forward.module is loaded.blocks[0]
    before = loaded.blocks[0].calls
    assert same_grads(reference, grads_after_step(loaded, x))
    assert loaded.blocks[0].calls == before + 2  # forward and recompute: the plan runs after loading
    execute.undo(loaded)
    assert "forward" not in loaded.blocks[0].__dict__


def test_patched_forwards_report_the_signature_they_replaced() -> None:
    import inspect

    model = Net().train()
    before = inspect.signature(model.blocks[0].forward)
    execute.apply(model, {"blocks.0": [RECOMPUTE]}, compile_budget=0.5)
    assert inspect.signature(model.blocks[0].forward) == before
    assert list(inspect.signature(model.forward).parameters) == ["x"]  # the root's, under a compiler budget
