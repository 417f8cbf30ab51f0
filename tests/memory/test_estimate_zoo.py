"""estimate (FakeTensorMode, nothing allocated) equals profile exactly on the tiny zoo models."""

import pytest
import torch

import tightfit

TINY = ["gpt2-tiny", "bert-base-tiny", "resnet50-tiny", "unet-tiny", "lstm-tiny"]


def _both(name):
    model_factory, batch_factory = tightfit.zoo.get(name)
    fake = tightfit.estimate(model_factory, batch_factory, optimizer_factory=torch.optim.AdamW)
    model = model_factory()
    optimizer = torch.optim.AdamW(model.parameters())
    real = tightfit.profile(model, batch_factory(), optimizer=optimizer, time_steps=0)
    return real, fake


@pytest.mark.parametrize("name", TINY)
def test_estimate_equals_profile_on_zoo(name):
    real, fake = _both(name)
    assert real.activations_bytes > 0
    assert (fake.activations_bytes, fake.peak_bytes) == (real.activations_bytes, real.peak_bytes)
    assert (fake.params_bytes, fake.optimizer_bytes) == (real.params_bytes, real.optimizer_bytes)
    assert fake.flops == real.flops
    assert fake.per_module == real.per_module


def test_estimate_of_llama_is_an_upper_bound():
    """transformers treats FakeTensors as graph tracing and then builds an explicit causal mask, so its
    grouped-query attention repeats k/v instead of using SDPA's GQA: the fake program saves more."""
    real, fake = _both("llama-1b-tiny")
    assert fake.activations_bytes >= real.activations_bytes
    assert fake.peak_bytes >= real.peak_bytes
    assert (fake.params_bytes, fake.optimizer_bytes) == (real.params_bytes, real.optimizer_bytes)
