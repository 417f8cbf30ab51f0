"""Planning a model that is already wrapped by DDP is refused with the order that works (plans are made on
the plain model with one rank's batch, then the model is wrapped): `rematerialize` and `tightfit.plan`."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import tightfit
from tightfit.errors import UserError


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("verb", ["rematerialize", "plan"])
def test_planning_a_wrapped_model_is_refused_with_the_order_that_works(one_rank_group, verb: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
    wrapped = nn.parallel.DistributedDataParallel(model)
    batch = torch.randn(4, 8)
    with pytest.raises(UserError, match="apply tightfit to the plain model first"):
        getattr(tightfit, verb)(wrapped, batch, "1GiB", loss_fn=lambda out: out.sum())
