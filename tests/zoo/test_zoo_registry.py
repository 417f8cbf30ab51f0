"""The zoo's names, factories and sample batches (tiny models built for real; big ones only on meta)."""

import subprocess
import sys

import pytest
import torch

from tightfit import zoo
from tightfit._step import forward_loss

BIG = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "bert-base", "roberta-base", "llama-1b"]
BIG += ["resnet50", "unet", "lstm"]
TINY = [f"{n}-tiny" for n in BIG]


def test_every_model_has_a_tiny_variant_and_names_are_sorted():
    names = zoo.names()
    assert names == sorted(names)
    for n in BIG + TINY + ["gpt2-small-cpu"]:
        assert n in names
    assert not any(n.endswith("-tiny") for n in zoo.names(include_tiny=False))


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_trains_one_step(name):
    model_factory, batch_factory = zoo.get(name)
    model, batch = model_factory(), batch_factory()
    assert model.training
    loss = forward_loss(model, batch)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert len(with_grad) >= 0.9 * len(list(model.parameters()))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["gpt2-tiny", "resnet50-tiny"])
def test_sample_batches_are_fixed_by_seed(name):
    _, batch_factory = zoo.get(name)
    a, b, c = batch_factory(), batch_factory(), batch_factory(seed=1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_batch_options_and_shapes():
    _, tokens = zoo.get("gpt2-tiny")
    batch = tokens(batch_size=3, seq_len=5)
    assert batch["input_ids"].shape == (3, 5) and batch["input_ids"].dtype == torch.long
    assert int(batch["input_ids"].max()) < 512
    _, images = zoo.get("resnet50-tiny")
    batch = images(batch_size=3, image_size=24, dtype="bfloat16")
    assert batch["x"].shape == (3, 3, 24, 24) and batch["x"].dtype == torch.bfloat16
    assert batch["labels"].shape == (3,)
    _, masks = zoo.get("unet-tiny")
    assert masks(image_size=16)["labels"].shape == (2, 16, 16)


def test_masked_lm_batch_masks_a_fraction_and_ignores_the_rest():
    _, batch_factory = zoo.get("bert-base-tiny")
    batch = batch_factory(batch_size=8, seq_len=64)
    chosen = batch["labels"] != -100
    assert 0.05 < chosen.float().mean() < 0.3
    assert (batch["input_ids"][chosen] == 3).all() and (batch["input_ids"][~chosen] != 3).all()


@pytest.mark.parametrize(
    ("name", "kwargs", "needle"),
    [
        ("gpt2-tiny", {"image_size": 32}, "takes token sequences"),
        ("resnet50-tiny", {"seq_len": 32}, "takes images"),
        ("gpt2-tiny", {"seq_len": 129}, "exceeds the model's 128 positions"),
        ("unet-tiny", {"image_size": 30}, "multiple of 4"),
        ("gpt2-tiny", {"batch_size": 0}, "positive integer"),
        ("gpt2-tiny", {"dtype": "float8"}, "unknown dtype"),
    ],
)
def test_bad_batch_options_say_what_is_wrong(name, kwargs, needle):
    with pytest.raises(zoo.ZooError, match=needle):
        zoo.get(name).batch_factory(**kwargs)


def test_unknown_name_lists_valid_names_and_close_matches():
    with pytest.raises(zoo.UnknownModelError) as e:
        zoo.get("gpt-2")
    msg = str(e.value)
    assert "did you mean 'gpt2'" in msg and "llama-1b" in msg and "file.py:factory" in msg
    assert isinstance(e.value, ValueError)


def test_model_factory_is_deterministic_and_leaves_global_rng_alone():
    make = zoo.get("llama-1b-tiny").model_factory
    state = torch.get_rng_state()
    a, b = make(), make()
    assert torch.equal(torch.get_rng_state(), state)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    c = make(seed=1)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_causal_lms_train_without_a_kv_cache():
    for name in ["gpt2-tiny", "llama-1b-tiny"]:
        assert zoo.get(name).model_factory().config.use_cache is False
    assert zoo.get("gpt2-tiny").model_factory(use_cache=True).config.use_cache is True


def test_dtype_and_overrides():
    model = zoo.get("gpt2-tiny").model_factory(dtype=torch.bfloat16, n_layer=1)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert len(model.transformer.h) == 1
    assert torch.get_default_dtype() == torch.float32
    net = zoo.get("resnet50-tiny").model_factory(layers=(2, 1, 1, 1))
    assert [len(s) for s in net.stages] == [2, 1, 1, 1]
    with pytest.raises(zoo.ZooError, match="unknown config option.*n_layers.*valid options"):
        zoo.get("gpt2-tiny").model_factory(n_layers=3)
    with pytest.raises(zoo.ZooError, match="unknown config option.*depthh"):
        zoo.get("unet-tiny").model_factory(depthh=3)


def _gpt2_params(L, d, V=50257, P=1024):
    # wte + wpe + per block (ln1, attn qkv+proj, ln2, mlp 4d) + ln_f; the LM head is tied to wte
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    return V * d + P * d + L * block + 2 * d


def _count_on_meta(name):
    with torch.device("meta"):
        model = zoo.get(name).model_factory()
    assert all(p.device.type == "meta" for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "layers", "width"), [("gpt2", 12, 768), ("gpt2-medium", 24, 1024), ("gpt2-large", 36, 1280)]
)
def test_gpt2_sizes_on_meta(name, layers, width):
    assert _count_on_meta(name) == _gpt2_params(layers, width)


def test_big_models_have_their_published_sizes_without_allocating():
    n = _count_on_meta("gpt2-xl")
    assert n == _gpt2_params(48, 1600) and abs(n - 1.558e9) < 1e6
    d, L, V, kv, I = 2048, 16, 32000, 8 * 64, 7168
    llama = 2 * V * d + L * (2 * d * d + 2 * d * kv + 3 * d * I + 2 * d) + d
    assert _count_on_meta("llama-1b") == llama and 0.95e9 < llama < 1.1e9
    assert _count_on_meta("resnet50") == 25_557_032  # torchvision's resnet50
    H = E = 650
    lstm = 10000 * E + (4 * H * (E + H) + 8 * H) * 2 + H * 10000 + 10000
    assert _count_on_meta("lstm") == lstm
    assert 109e6 < _count_on_meta("bert-base") < 111e6
    assert 124e6 < _count_on_meta("roberta-base") < 126e6
    assert 30e6 < _count_on_meta("unet") < 32e6


def test_tiny_models_build_and_run_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    for name in ["gpt2-tiny", "unet-tiny"]:
        model_factory, batch_factory = zoo.get(name)
        with FakeTensorMode():
            model, batch = model_factory(), batch_factory()
            loss = forward_loss(model, batch)
            loss.backward()
        assert isinstance(loss, FakeTensor)
        assert all(isinstance(p, FakeTensor) for p in model.parameters())


def test_importing_the_zoo_does_not_import_transformers():
    code = "import sys, tightfit.zoo as z; z.names(); print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
