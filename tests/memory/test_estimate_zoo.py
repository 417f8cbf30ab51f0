"""estimate (FakeTensorMode, nothing allocated) equals profile exactly on the tiny zoo models."""

import pytest
import torch

import tightfit

TINY = ["gpt2-tiny", "bert-base-tiny", "llama-1b-tiny", "resnet50-tiny", "unet-tiny", "lstm-tiny"]


@pytest.mark.parametrize("name", TINY)
def test_estimate_equals_profile_on_zoo(name):
    model_factory, batch_factory = tightfit.zoo.get(name)
    fake = tightfit.estimate(model_factory, batch_factory, optimizer_factory=torch.optim.AdamW)
    model = model_factory()
    real = tightfit.profile(
        model, batch_factory(), optimizer=torch.optim.AdamW(model.parameters()), time_steps=0
    )
    assert real.activations_bytes > 0
    assert (fake.activations_bytes, fake.peak_bytes) == (real.activations_bytes, real.peak_bytes)
    assert (fake.params_bytes, fake.optimizer_bytes, fake.flops) == (
        real.params_bytes,
        real.optimizer_bytes,
        real.flops,
    )
    assert fake.per_module == real.per_module
