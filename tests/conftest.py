"""Shared test settings: deterministic, single-threaded torch so timings and results don't depend on load."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
