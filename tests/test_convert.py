"""convert_ is silent by default and reversible: undo restores module objects, types, state_dict and outputs
bit for bit (a small MLP, a tiny HF GPT-2, a Llama-style SwiGLU model; FewBit and Sketch), refuses to run
twice or after an incompatible change, and a conversion that fails midway leaves the model as it was."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import tightfit
from tightfit import convert as convert_module
from tightfit import zoo
from tightfit.fewbit.config import FewBit
from tightfit.fewbit.gated import FewBitGatedMLP
from tightfit.sketch.config import Sketch


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 4))
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(x))


class SwiGLU(nn.Module):
    """A Llama-style gated MLP (the exact forward FewBit's gated conversion recognises)."""

    def __init__(self, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _mlp():
    return MLP(), lambda: torch.randn(16, 8)


def _swiglu():
    return nn.Sequential(nn.Linear(8, 16), SwiGLU(), SwiGLU(), nn.Linear(16, 4)), lambda: torch.randn(4, 8, 8)


def _zoo(name: str):
    def make():
        model_factory, batch_factory = zoo.get(name)
        return model_factory(), lambda: batch_factory(batch_size=2)

    return make


MODELS = {"mlp": _mlp, "swiglu": _swiglu, "gpt2-tiny": _zoo("gpt2-tiny"), "llama-tiny": _zoo("llama-1b-tiny")}
CONFIGS = {"fewbit": [FewBit(bits=2)], "sketch": [Sketch(ratio=0.5)], "both": [FewBit(bits=3), Sketch(k=4)]}


def _square(y: torch.Tensor) -> torch.Tensor:
    return y.square().mean()


def _loss(model: nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).loss
    return _square(model(batch))


def _outputs(model: nn.Module, batch, seed: int) -> list[torch.Tensor]:
    """Loss and every parameter gradient of one step (dropout and sketches drawn from `seed`)."""
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    loss = _loss(model, batch)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return [loss.detach(), *grads]


def _snapshot(model: nn.Module):
    return (
        [(path, m) for path, m in model.named_modules(remove_duplicate=False)],
        [(path, type(m)) for path, m in model.named_modules(remove_duplicate=False)],
        {k: (v.dtype, v.clone()) for k, v in model.state_dict().items()},
        [(n, p) for n, p in model.named_parameters(remove_duplicate=False)],
        [m.training for m in model.modules()],
    )


def _assert_restored(model: nn.Module, before) -> None:
    modules, types, state, params, training = before
    now_modules, now_types, now_state, now_params, now_training = _snapshot(model)
    assert now_types == types  # every named_modules() type
    assert len(now_modules) == len(modules) and all(
        p == q and m is n for (p, m), (q, n) in zip(now_modules, modules)
    )  # the very same module objects
    assert list(now_state) == list(state)
    for k, (dtype, value) in state.items():
        assert now_state[k][0] == dtype and torch.equal(now_state[k][1], value), k
    assert len(now_params) == len(params) and all(
        a == b and p is q for (a, p), (b, q) in zip(now_params, params)
    )
    assert now_training == training


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_convert_then_undo_restores_the_model_exactly(model_name: str, config_name: str) -> None:
    torch.manual_seed(0)
    model, make_batch = MODELS[model_name]()
    reference = copy.deepcopy(model)
    before = _snapshot(model)
    reports = [tightfit.convert_(model, config) for config in CONFIGS[config_name]]
    assert all(len(r) > 0 for r in reports)
    assert [type(m) for m in model.modules()] != [type(m) for m in reference.modules()]
    for report in reversed(reports):
        report.undo()
        assert report.undone
    _assert_restored(model, before)
    torch.manual_seed(1)
    batch = make_batch()  # fresh random input, never seen by the conversion
    got, want = _outputs(model, batch, seed=2), _outputs(reference, batch, seed=2)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_sketch_with_example_undo_restores_buffers_and_rng() -> None:
    torch.manual_seed(0)
    model, make_batch = _mlp()
    before = _snapshot(model)
    example = make_batch()
    rng = torch.get_rng_state()
    report = tightfit.convert_(model, Sketch(ratio=0.5), example=example, loss_fn=_square)
    assert report.metrics["peak_before"] is not None
    assert torch.equal(torch.get_rng_state(), rng)  # the probe and the measurement consume no randomness
    report.undo()
    _assert_restored(model, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sketch_with_example_leaves_the_cuda_generator_alone() -> None:
    model, make_batch = _mlp()
    model.cuda()
    example = make_batch().cuda()
    cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state()
    report = tightfit.convert_(model, Sketch(ratio=0.5), example=example, loss_fn=_square)
    assert torch.equal(torch.get_rng_state(), cpu) and torch.equal(torch.cuda.get_rng_state(), cuda)
    report.undo()


def test_convert_prints_nothing_unless_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    model, make_batch = _mlp()
    fewbit = tightfit.convert_(model, FewBit(bits=2))
    sketch = tightfit.convert_(model, Sketch(ratio=0.5), example=make_batch(), loss_fn=_square)
    assert capsys.readouterr().out == ""
    sketch.undo()
    fewbit.undo()
    report = tightfit.convert_(model, FewBit(bits=2), verbose=True)
    assert capsys.readouterr().out == f"{report}\n"


def test_undo_twice_raises() -> None:
    model, _ = _mlp()
    report = tightfit.convert_(model, FewBit(bits=2))
    report.undo()
    with pytest.raises(RuntimeError, match="already undone"):
        report.undo()
    with pytest.raises(RuntimeError, match="not returned by tightfit.convert_"):
        tightfit.ConversionReport("manual").undo()


def test_undo_after_an_incompatible_change_raises_and_changes_nothing() -> None:
    model, _ = _mlp()
    report = tightfit.convert_(model, FewBit(bits=2))
    stranger = nn.Tanh()
    model.net[1] = stranger
    with pytest.raises(RuntimeError, match=r"net\.1 holds Tanh"):
        report.undo()
    assert model.net[1] is stranger and not report.undone

    model, _ = _mlp()
    report = tightfit.convert_(model, Sketch(ratio=0.5))
    converted = model.net[0]
    converted.weight = nn.Parameter(converted.weight.detach().clone())
    with pytest.raises(RuntimeError, match=r"net\.0\.weight was replaced"):
        report.undo()
    assert model.net[0] is converted


def test_undo_out_of_order_raises_then_in_order_works() -> None:
    model, make_batch = _swiglu()
    before = _snapshot(model)
    fewbit = tightfit.convert_(model, FewBit(bits=2))
    assert isinstance(model[1], FewBitGatedMLP)
    sketch = tightfit.convert_(model, Sketch(ratio=0.5))  # converts the linears inside FewBitGatedMLP
    with pytest.raises(RuntimeError, match=r"1\.gate_proj was replaced"):
        fewbit.undo()
    sketch.undo()
    fewbit.undo()
    _assert_restored(model, before)


def test_train_eval_switch_after_conversion_carries_over() -> None:
    model, _ = _swiglu()
    model.eval()
    before = _snapshot(model)
    report = tightfit.convert_(model, FewBit(bits=2))
    report.undo()
    _assert_restored(model, before)
    report = tightfit.convert_(model, FewBit(bits=2))
    model.train()
    report.undo()
    assert all(m.training for m in model.modules())


def test_failing_fewbit_conversion_leaves_the_model_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    import tightfit.fewbit.convert as fewbit_convert

    model, _ = _mlp()
    before = _snapshot(model)
    calls = 0
    real = fewbit_convert._short

    def fail_midway(module: nn.Module) -> str:  # runs after each replacement
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("boom")
        return real(module)

    monkeypatch.setattr(fewbit_convert, "_short", fail_midway)
    with pytest.raises(RuntimeError, match="boom"):
        tightfit.convert_(model, FewBit(bits=2))
    _assert_restored(model, before)


def test_failing_sketch_measurement_leaves_the_model_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    import tightfit.sketch.convert as sketch_convert

    model, make_batch = _mlp()
    before = _snapshot(model)
    real = sketch_convert._measure_peak
    calls = 0

    def fail_after_replacing(*args, **kwargs) -> int:  # the second measurement runs on the converted model
        nonlocal calls
        calls += 1
        if calls == 2:
            assert type(model.net[0]) is not nn.Linear
            raise MemoryError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(sketch_convert, "_measure_peak", fail_after_replacing)
    with pytest.raises(MemoryError):
        tightfit.convert_(model, Sketch(ratio=0.5), example=make_batch(), loss_fn=_square)
    _assert_restored(model, before)


@dataclass(frozen=True)
class _Half:
    """A test-only config: its handler replaces two modules, then fails."""


def test_a_handler_failing_midway_is_rolled_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(model: nn.Module, config: _Half, filter_fn=None) -> tightfit.ConversionReport:
        convert_module.replace_module(model, "net.1", nn.ReLU())
        convert_module.replace_module(model, "net.3", nn.ReLU())
        raise ValueError("handler failed")

    monkeypatch.setitem(convert_module._HANDLERS, _Half, handler)
    model, _ = _mlp()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="handler failed"):
        tightfit.convert_(model, _Half())
    _assert_restored(model, before)


def test_unknown_options_and_bad_paths_are_named() -> None:
    model, make_batch = _mlp()
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['example'\]; valid: \['functional'\]"):
        tightfit.convert_(model, FewBit(bits=2), example=make_batch())
    with pytest.raises(TypeError, match=r"\['exmaple'\]; valid: \['example', 'loss_fn', 'measure'\]"):
        tightfit.convert_(model, Sketch(), exmaple=make_batch())
    with pytest.raises(ValueError, match="not a submodule"):
        convert_module.replace_module(model, "net.missing", nn.ReLU())
    assert all(type(m) is not nn.ReLU for m in model.modules())
