"""Plan without the target machine (``tightfit plan MODEL --budget X --estimate``).

The model, its batch and the optimizer are built by factories under ``FakeTensorMode``: nothing is
allocated, so a laptop can plan a run of a model larger than its memory. The same planner runs as for a
real model, with two changes:

- memory is exact for the kernels PyTorch picks *on this machine's device type* (FakeTensorMode runs the
  real shape logic; on CPU it matches real runs byte for byte, see tests/memory/test_estimate_zoo.py).
  A GPU run can pick other kernels (flash/efficient attention instead of the CPU path; cuDNN
  convolutions with their own workspaces) and its caching allocator rounds sizes up, so the peak there
  may differ: APPROXIMATE.
- time comes from counts: FLOPs (torch's FLOP formulas, ``tightfit.memory.flops``: matmuls, convolutions,
  attention) at a nominal ``flop_rate`` FLOP/s, plus the bytes every op writes at ``flop_rate / 50``
  bytes/s (so pointwise ops, norms and softmax cost their memory traffic). No fusion, overlap, kernel
  launch or Python overhead is modelled, and absolute times are only as good as ``flop_rate``:
  APPROXIMATE; ratios between plans are the useful part.
- gradients cannot be compared under fake tensors, so the bit-exactness check of each option is skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from tightfit._step import LossFn
from tightfit.remat.auto import Planner, Progress
from tightfit.remat.config import RematConfig
from tightfit.remat.plan import Plan

DEFAULT_FLOP_RATE = 1e12  # FLOP/s: a nominal 1 TFLOP/s; only ratios between plans are meaningful


def estimate_planner(
    model_factory: Callable[[], torch.nn.Module],
    batch_factory: Callable[[], Any],
    loss_fn: LossFn | None = None,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer] | None = None,
    config: RematConfig | None = None,
    *,
    progress: Progress | None = None,
) -> tuple[Planner, Any]:
    """A ``Planner`` measured under FakeTensorMode, and the fake mode (plans must be made inside it).
    ``config`` as for ``rematerialize``; its ``flop_rate`` defaults to ``DEFAULT_FLOP_RATE``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = RematConfig() if config is None else config
    if config.flop_rate is None:
        config = dataclasses.replace(config, flop_rate=DEFAULT_FLOP_RATE)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = model_factory().train()
        batch = batch_factory()
        optimizer = optimizer_factory(model.parameters()) if optimizer_factory is not None else None
        planner = Planner(model, batch, loss_fn, optimizer, config, progress=progress)
    return planner, mode


def estimate_plan(
    model_factory: Callable[[], torch.nn.Module],
    batch_factory: Callable[[], Any],
    budget: int | float | str,
    loss_fn: LossFn | None = None,
    optimizer_factory: Callable[[Any], torch.optim.Optimizer] | None = None,
    config: RematConfig | None = None,
    *,
    progress: Progress | None = None,
) -> Plan:
    """The plan ``rematerialize`` would choose, computed under fake tensors (see the module docstring).

    ``plan.measured_peak`` is the peak measured under fake tensors; ``plan.time`` and ``measured_time``
    are FLOP-based. Apply it to the real model with ``tightfit.remat.execute.apply(model, plan.options)``.
    Raises ``InfeasibleBudget`` like ``rematerialize``.
    """
    planner, mode = estimate_planner(
        model_factory, batch_factory, loss_fn, optimizer_factory, config, progress=progress
    )
    flop_rate = planner.config.flop_rate
    with mode:
        plan = planner.plan(budget)
    plan.notes.append(
        f"estimated under FakeTensorMode: memory exact for this device type's kernels, times from FLOP "
        f"and bytes written at {flop_rate:.3g} FLOP/s and {flop_rate / 50:.3g} B/s"
    )
    return plan
