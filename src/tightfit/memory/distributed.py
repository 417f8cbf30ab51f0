"""The ruler across processes: which rank this is, every rank's peak, a fake process group for estimates,
and the order in which tightfit's techniques and torch's data-parallel wrappers compose.

NOTE [ Order of composition ]
  Techniques change the model's modules; the wrappers then distribute the result:
    1. ``tightfit.convert_(model, FewBit(...))`` / ``Sketch(...)`` and ``tightfit.rematerialize(model, batch,
       budget)`` on the plain model, with the batch one rank sees (what each rank trains on);
    2. then DDP (``DistributedDataParallel(model)``, non-reentrant checkpointing: no ``static_graph``), or
       FSDP2: ``fully_shard(block)`` for every block, then ``fully_shard(model)`` (``parallelize_``), so each
       checkpoint region sits inside one ``fully_shard`` unit (torchtitan's order; the other order
       all-gathers a block's parameters once more in the backward). A plan for FSDP2 keeps every region
       inside one block (``RematConfig(segments=False)``); ``parallelize_`` refuses one that does not
       (``check_regions_fit_units``).
  ``check_unwrapped`` refuses a model that is already wrapped (the planner would measure the wrapper's
  collectives, in an order that may differ between ranks).

NOTE [ Budgets per rank ]
  A budget is the peak of one rank. ``rank_budget`` turns it into the budget to plan the plain model
  for, on one rank's batch, so that the wrapped step stays within it.
  DDP keeps gradient buckets as large as the trainable parameters for the whole step on top of the plain
  step: their bytes come off.
  FSDP2 on N ranks: at every moment of the step, the plain step holds the full parameters P and
  optimizer state O, the FSDP2 step their shards, P/N and O/N, plus what it gathers: the root unit's
  parameters R (the parameters outside the blocks, gathered from the forward to the end of the
  backward), the running block's and the prefetched next block's parameters (2·L, L the largest
  block's bytes), the running block's unsharded gradients before their reduce-scatter (L) and the
  collectives' staging buffers (all-gather input, reduce-scatter output, bounded by L). Gradients are
  no larger in the FSDP2 step than in the plain one at the same moment (sharded once reduced) and give
  no credit, because the plain step's peak may fall in the forward, before any gradient exists. So
      rank budget = budget + max(0, (1 - 1/N)·(P + O) - (R + 4·L)).
  Where the gathered units outweigh what this bound credits (few, large blocks) the budget is kept as
  given: then the plan relies on the gradients' sharding, which the bound leaves out, and is not
  guaranteed (measured within the budget on every rank in the tests for such a model).
  O counts the state the optimizer passed holds (create it first: ``ensure_optimizer_state``); without
  one, only parameters are credited. Activations are the same in both steps (same batch, same plan).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tightfit.errors import InvalidInput, UserError
from tightfit.memory.live import unique_bytes

PARALLEL = ("ddp", "fsdp2")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def can_communicate() -> bool:
    """Whether the default process group exists, spans several ranks and really communicates (the fake
    backend of estimates does not)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    return dist.get_backend() != "fake"


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (a collective: every rank calls it); ``[obj]`` without a
    communicating group."""
    if not can_communicate():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrapper_of(model: nn.Module) -> str | None:
    """ "ddp", "fsdp2" or "fsdp" when ``model`` is (or contains) a data-parallel wrapper; None otherwise."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return "ddp"
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    for module in model.modules():
        if isinstance(module, FSDPModule):
            return "fsdp2"
        if isinstance(module, FullyShardedDataParallel):
            return "fsdp"
    return None


def check_unwrapped(model: nn.Module, verb: str = "rematerialize") -> None:
    """Raise `UserError` if ``model`` is already wrapped by DDP or FSDP: plans are made on the plain model
    (NOTE [ Order of composition ])."""
    kind = wrapper_of(model)
    if kind is None:
        return
    order = {
        "ddp": "DistributedDataParallel(model)",
        "fsdp2": "fully_shard(block) for each block, then fully_shard(model)",
        "fsdp": "FullyShardedDataParallel(model)",
    }[kind]
    raise UserError(
        f"{verb}: the model is already wrapped ({kind}); apply tightfit to the plain model first, with the "
        f"batch of one rank, then wrap it: {order}"
    )


def check_regions_fit_units(model: nn.Module) -> None:
    """Raise `UserError` if ``model`` carries a remat plan (``model.plan``, set by ``rematerialize``) whose
    checkpoint regions span several blocks: under FSDP2 each block is one unit, and recomputing a region
    that reaches into a unit whose backward has not started finds its parameters still sharded (torch
    then fails with "got mixed torch.Tensor and DTensor")."""
    plan = getattr(model, "plan", None)
    # the option types are remat's (a layer above the ruler): recognised by name, not imported
    spanning = [
        d.path
        for d in getattr(plan, "decisions", ())
        if type(getattr(d, "option", None)).__name__ in ("Segment", "InSegment")
    ]
    if spanning:
        raise UserError(
            f"the remat plan checkpoints runs of several blocks as one region ({', '.join(spanning[:4])}"
            f"{', ...' if len(spanning) > 4 else ''}); under FSDP2 every region must sit inside one "
            "fully_shard unit: plan with rematerialize(..., config=tightfit.RematConfig(segments=False))"
        )


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, the units FSDP2 shards one by one: the members of every
    ``nn.ModuleList``/``nn.Sequential`` of two or more modules of one type that hold parameters (a
    transformer's layers; an encoder-decoder's encoder layers and decoder layers), outermost families
    only (a mixture-of-experts layer is one unit, not each of its experts). In the model's order; empty
    when there is none."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()  # modules within a block already chosen
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1:
            children = list(module)
            one_type = len({type(c) for c in children}) == 1
            if one_type and all(any(True for _ in c.parameters()) for c in children):
                blocks.extend(c for c in children if id(c) not in inside)  # a module shared by two lists
                inside.update(id(m) for c in children for m in c.modules())
    return blocks


def parallelize_(model: nn.Module, parallel: str, mesh: Any = None) -> nn.Module:
    """Wrap ``model`` for data parallelism in the order NOTE [ Order of composition ] gives: ``"fsdp2"``:
    ``fully_shard`` on every block, then on the root (in place; returns the model); ``"ddp"``: returns
    ``DistributedDataParallel(model)`` (CPU models: no device ids). Needs an initialised process group."""
    if parallel not in PARALLEL:
        raise InvalidInput(f"parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        kwargs: dict[str, Any] = {}
        if mesh is not None:
            kwargs["process_group"] = mesh.get_group()
        return DistributedDataParallel(model, **kwargs)
    from torch.distributed.fsdp import fully_shard

    check_regions_fit_units(model)
    for block in find_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def ddp_bucket_bytes(model: nn.Module) -> int:
    """Bytes of the gradient buckets DDP keeps for ``model`` (one per trainable parameter byte)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def rank_budget(
    model: nn.Module,
    budget: int,
    parallel: str,
    *,
    optimizer: Any = None,
    world_size: int | None = None,
) -> int:
    """The budget to plan the plain ``model`` for, on one rank's batch, so that the wrapped step of each
    rank stays within ``budget`` bytes (NOTE [ Budgets per rank ]). FSDP2: ``world_size`` defaults to
    the default process group's; ``optimizer`` (with its state created) lets its sharded state count."""
    if parallel not in PARALLEL:
        raise InvalidInput(f"parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    if parallel == "ddp":
        return budget - ddp_bucket_bytes(model)
    n = world_size if world_size is not None else rank_and_world()[1]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidInput(f"world_size must be a positive int, got {n!r}")
    if n == 1:
        return budget
    params = unique_bytes(list(model.parameters()))
    blocks = [unique_bytes(list(block.parameters())) for block in find_blocks(model)]
    root = params - sum(blocks)
    largest = max(blocks, default=0)
    state = 0
    if optimizer is not None:
        # the top-level tensors of each parameter's state (tensors nested in lists are not counted)
        state = unique_bytes(
            [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        )
    return budget + max(0, (params + state) * (n - 1) // n - (root + 4 * largest))


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[Any]:
    """A process group of ``world_size`` ranks that does not communicate (torch's fake backend, as
    torchtitan's estimator uses), this process being rank 0; yields a 1-D CPU device mesh over it. For
    estimates only: collectives return at once and leave their outputs as they were."""
    import torch.distributed as dist

    if world_size < 1:
        raise InvalidInput(f"world_size must be >= 1, got {world_size}")
    if dist.is_initialized():
        raise UserError(
            "estimating for another world size needs a fake process group, but this process already has "
            "one; run the estimate in a process without torch.distributed initialised"
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        # the mesh reads its ranks from real tensors: built before any FakeTensorMode is entered
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()
