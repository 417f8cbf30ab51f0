"""convert_ with FewBit: tiny zoo GPT-2 / BERT / Llama: all activations converted, keys kept, trains."""

import pytest
import torch
from torch import nn

import tightfit
from tightfit import zoo
from tightfit.fewbit import modules as M
from tightfit.fewbit.activations import spec_for_module
from tightfit.fewbit.config import FewBit
from tightfit.fewbit.gated import FewBitGatedMLP


def convert(model, config, filter_fn=None):
    """tightfit.convert_, the public verb (silent by default)."""
    return tightfit.convert_(model, config, filter_fn)


def _activation_modules(model):
    return [p for p, m in model.named_modules() if spec_for_module(m) is not None]


@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-base-tiny", "llama-1b-tiny"])
def test_zoo_models_convert_and_train(name):
    model_factory, batch_factory = zoo.get(name)
    torch.manual_seed(0)
    model = model_factory()
    batch = batch_factory(batch_size=2)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    before = _activation_modules(model)
    assert before
    report = convert(model, FewBit(bits=2))
    assert _activation_modules(model) == [] or all(  # nothing left unconverted but gated act_fn's
        isinstance(model.get_submodule(p.rpartition(".")[0]), FewBitGatedMLP)
        for p in _activation_modules(model)
    )
    assert not report.skipped and len(report) > 0
    sd = model.state_dict()
    assert list(sd) == list(keys) and all(torch.equal(sd[k], keys[k]) for k in keys)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(6):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses


def test_llama_gated_mlp_matches_original_forward():
    model_factory, batch_factory = zoo.get("llama-1b-tiny")
    torch.manual_seed(0)
    model = model_factory().eval()
    batch = batch_factory(batch_size=2)
    ref = model(**batch).loss
    report = convert(model, FewBit(bits=3))
    assert any("FewBitGatedMLP" in after for _, _, after in report.converted)
    assert torch.equal(model(**batch).loss, ref)  # forward is bit-identical


def test_torch_modules_shared_and_filter():
    act = nn.GELU()
    model = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4), act, nn.Tanh(), nn.ReLU())
    report = convert(model, FewBit(bits=2), filter_fn=lambda m, path: path != "5")
    assert isinstance(model[1], M.GELU) and model[1] is model[3]  # the shared module stays shared
    assert isinstance(model[4], M.Tanh) and isinstance(model[5], nn.ReLU)
    assert {p for p, _, _ in report.converted} == {"1", "3", "4"}


def test_unsupported_error_leaves_model_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.PReLU())
    with pytest.raises(ValueError, match="PReLU"):
        convert(model, FewBit(bits=2, on_unsupported="error"))
    assert type(model[1]) is nn.GELU  # nothing half-converted
    report = convert(model, FewBit(bits=2))
    assert isinstance(model[1], M.GELU) and [p for p, _ in report.skipped] == ["2"]


def test_include_exclude_and_already_converted():
    model = nn.Sequential(nn.GELU(), nn.SiLU(), nn.Tanh())
    report = convert(model, FewBit(bits=2, exclude=("silu",)))
    assert isinstance(model[0], M.GELU) and type(model[1]) is nn.SiLU
    assert ("1", "silu in FewBit.exclude") in report.skipped
    again = convert(model, FewBit(bits=2, include=("silu",)))
    assert isinstance(model[1], M.SiLU) and len(again) == 1


def test_config_json_roundtrip_and_validation():
    cfg = FewBit(bits=3, include=("gelu",), exclude=("tanh",))
    assert FewBit.from_json(cfg.to_json()) == cfg
    assert tightfit.FewBit is FewBit
    with pytest.raises(ValueError, match="1..8"):
        FewBit(bits=0)
    with pytest.raises(ValueError, match="unknown activation"):
        FewBit(include=("gelu_nwe",))


def test_calibrated_tables():
    from tightfit.fewbit.calibrate import calibrate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 16), nn.SiLU())
    batches = [torch.randn(32, 4) * 3 for _ in range(3)]
    cal = calibrate(model, batches)
    report = convert(model, FewBit(bits=2, calibration=cal))
    assert len(report) == 2
    default = M.GELU(bits=2).table
    assert model[1].table.bits == 2 and not torch.equal(model[1].table.borders, default.borders)
    x = torch.randn(8, 4, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None


# -- torch's own layers: activation functions held as attributes, functional calls -----------------------


def _encoder(activation="gelu", layers=3):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation=activation, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def test_transformer_encoder_converts_every_layer_activation_and_undoes():
    import torch.nn.functional as F

    enc = _encoder()
    x = torch.randn(2, 5, 16, requires_grad=True)
    ref = enc(x)
    keys = list(enc.state_dict())
    report = convert(enc, FewBit(bits=2))
    assert [p for p, _, _ in report.converted] == [f"layers.{i}.activation" for i in range(3)]
    assert all(isinstance(layer.activation, M.GELU) for layer in enc.layers)
    assert all(layer.activation_relu_or_gelu == 2 for layer in enc.layers)  # eval fast path kept
    assert list(enc.state_dict()) == keys
    assert torch.equal(enc(x), ref)  # few-bit forward is exact
    # the activation's input is kept as 2-bit codes, not as a float tensor of the FFN width
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        enc(x).sum()
    assert not any(t.dtype == torch.float32 and t.shape[-1] == 32 and t.dim() == 3 for t in saved)
    enc.eval()
    with torch.no_grad():  # eval fast path (fused kernel) still gives the same output
        torch.testing.assert_close(enc(x), ref)
    report.undo()
    assert all(layer.activation is F.gelu and "activation" not in layer._modules for layer in enc.layers)
    assert list(enc.state_dict()) == keys


def test_relu_encoder_and_filter_and_exclude():
    enc = _encoder("relu", layers=2)
    report = convert(enc, FewBit(bits=1, exclude=("relu",)))
    assert len(report) == 0 and [p for p, _ in report.skipped] == [
        "layers.0.activation",
        "layers.1.activation",
    ]
    report = convert(enc, FewBit(bits=1), lambda m, p: p != "layers.1")
    assert [p for p, _, _ in report.converted] == ["layers.0.activation"]


class _FunctionalMLP(nn.Module):
    """Calls F.gelu / F.silu in its own forward (no activation module to swap)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 32)
        self.down = nn.Linear(32, 8)

    def forward(self, x):
        import torch.nn.functional as F

        return self.down(F.gelu(self.up(x)) + F.silu(self.up(x)))


def _float_saves(model, x):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x).sum()
    return [tuple(t.shape) for t in saved if t.is_floating_point()]


def test_functional_override_is_scoped_and_undone():
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(_FunctionalMLP(), _FunctionalMLP())
    x = torch.randn(4, 8, requires_grad=True)
    ref = model(x)
    plain = _float_saves(model, x)
    assert convert(model, FewBit(bits=2)).converted == []  # not seen without functional=True
    report = tightfit.convert_(model, FewBit(bits=2), functional=True)
    assert [p for p, _, _ in report.converted] == ["0.forward", "1.forward"]
    assert torch.equal(model(x), ref)
    fewbit = _float_saves(model, x)
    # each MLP's two activations kept their (4, 32) float input before, codes after
    assert plain.count((4, 32)) - fewbit.count((4, 32)) == 4
    y = torch.randn(4, 32, requires_grad=True)
    g_ref = torch.autograd.grad(F.gelu(y).sum(), y)[0]  # outside the model: torch's own gelu
    assert torch.equal(g_ref, torch.autograd.grad(F.gelu(y).sum(), y)[0])
    loss = model(x).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    report.undo()
    assert "forward" not in model[0].__dict__
    assert _float_saves(model, x) == plain


def test_undo_refuses_when_a_scoped_forward_was_replaced_and_changes_nothing():
    """The swapped forwards are recorded in convert_'s journal with the module replacements: undo checks
    them all before putting anything back."""
    torch.manual_seed(0)
    model = nn.Sequential(_FunctionalMLP(), _FunctionalMLP())
    report = tightfit.convert_(model, FewBit(bits=2), functional=True)
    scoped = model[0].__dict__["forward"]
    model[1].forward = lambda x: x  # something put on top of the conversion
    with pytest.raises(RuntimeError, match="1.forward was changed after the conversion"):
        report.undo()
    assert model[0].__dict__["forward"] is scoped and not report.undone
    del model[1].forward
    with pytest.raises(RuntimeError, match="1.forward was changed"):
        report.undo()


def test_functional_override_recomputes_under_checkpoint():
    """The override covers the recompute (same instance forward): non-reentrant checkpoint sees the same
    saved tensors in the recompute, so it neither errors nor falls back."""
    torch.manual_seed(0)
    model = _FunctionalMLP()
    x = torch.randn(4, 8, requires_grad=True)
    tightfit.convert_(model, FewBit(bits=2), functional=True)
    ref = torch.autograd.grad(model(x).sum(), x)[0]
    out = torch.utils.checkpoint.checkpoint(model.forward, x, use_reentrant=False)
    assert torch.equal(torch.autograd.grad(out.sum(), x)[0], ref)


class _GeluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        import torch.nn.functional as F

        return F.gelu(self.fc(x))


def test_functional_scope_deep_copies_and_pickles_and_undoes_exactly():
    """A copy of a scoped model runs its own weights (still scoped); torch.save/load round-trips it."""
    import copy
    import io

    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(_FunctionalMLP(), _GeluNet())
    before = [(m, dict(m.__dict__)) for m in model.modules()]
    x = torch.randn(4, 8, requires_grad=True)
    plain = _float_saves(model, x)
    report = tightfit.convert_(model, FewBit(bits=2), functional=True)
    scoped = _float_saves(model, x)
    assert scoped.count((4, 32)) < plain.count((4, 32))  # activation inputs kept as codes
    twin = copy.deepcopy(model)
    assert _float_saves(twin, x) == scoped  # the copy is scoped too
    with torch.no_grad():
        twin[1].fc.weight.zero_()
        twin[1].fc.bias.fill_(1.0)
    assert torch.equal(twin(x), F.gelu(torch.ones(4, 8)))  # the copy's own weights
    assert not torch.equal(model(x), twin(x))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), model(x)) and _float_saves(loaded, x) == scoped
    g_model = torch.autograd.grad(model(x).sum(), x)[0]
    assert torch.equal(torch.autograd.grad(loaded(x).sum(), x)[0], g_model)
    report.undo()
    after = [(m, dict(m.__dict__)) for m in model.modules()]
    assert [m for m, _ in before] == [m for m, _ in after]
    for (_, d0), (_, d1) in zip(before, after):
        assert set(d0) == set(d1) and all(d0[k] is d1[k] for k in d0 if k not in ("_modules", "training"))
    assert _float_saves(model, x) == plain


def _act(x):
    import torch.nn.functional as F

    return F.gelu(x)  # reached through a helper: the block's own source names no gelu(


class _HelperBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x):
        return x + self.b(_act(self.a(x)))


class _CheckpointedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_HelperBlock() for _ in range(2))
        self.out = nn.Linear(16, 16)
        self.ckpt = True

    def forward(self, x):
        import torch.nn.functional as F

        for b in self.blocks:
            x = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=False) if self.ckpt else b(x)
        return F.gelu(self.out(x)).sum()


def test_functional_scope_covers_the_recompute_of_a_checkpointed_submodule():
    """The child's recompute runs in backward, outside the parent's forward: the child is scoped too."""
    torch.manual_seed(0)
    model = _CheckpointedNet()
    tightfit.convert_(model, FewBit(bits=2), functional=True)
    x = torch.randn(4, 16)
    model.ckpt = False
    ref = torch.autograd.grad(model(x), list(model.parameters()))
    model.ckpt = True
    got = torch.autograd.grad(model(x), list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_functional_inplace_calls_keep_torchs_inplace_function():
    import torch.nn.functional as F

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            h = self.lin(x)
            F.silu(h, inplace=True)  # the return value is not used: the in-place write is
            g = h * 2.0
            F.mish(g, True)
            return g

    torch.manual_seed(0)
    model = InPlace()
    x = torch.randn(2, 4)
    ref = model(x)
    tightfit.convert_(model, FewBit(bits=2), functional=True)
    assert torch.equal(model(x), ref)
