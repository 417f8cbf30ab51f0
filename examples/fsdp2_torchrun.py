"""FSDP2 with a tightfit remat plan made for one rank's memory budget.

    torchrun --standalone --nproc_per_node=2 examples/fsdp2_torchrun.py [--steps 5] [--fraction 0.6]

The order that works (docs/distributed.md): tightfit changes the plain model first, planned on the batch
one rank sees, with every checkpoint region inside one block (``RematConfig(segments=False)``); then
``fully_shard`` wraps every block and then the root, so each checkpointed block is one FSDP2 unit; the
optimizer is made last, on the sharded parameters. Each rank prints the budget and its measured peak
(``tightfit.profile``, which every rank calls together).
On a machine without GPUs it runs on the CPU with the gloo backend.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import tightfit
from tightfit.memory import ensure_optimizer_state
from tightfit.memory.distributed import parallelize_, rank_budget
from tightfit.testing import TinyLM


def train(
    steps: int = 5, fraction: float = 0.6, batch_size: int = 2, seq: int = 128, layers: int = 4
) -> dict:
    """Plan, shard and train on an initialised process group; returns this rank's numbers."""
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    torch.manual_seed(0)  # the same initial weights on every rank
    model = TinyLM(layers=layers).to(device)
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    ids = torch.randint(0, 256, (batch_size, seq), generator=g).to(device)
    batch = {"ids": ids, "labels": torch.roll(ids, -1, dims=1)}

    # 1. the per-rank budget: here a fraction of the activations of the plain step (a real run names bytes)
    plain = tightfit.profile(model, batch, optimizer=torch.optim.AdamW(model.parameters()), time_steps=0)
    budget = int(plain.baseline_bytes + fraction * (plain.peak_bytes - plain.baseline_bytes))
    # 2. plan on the plain model, with one rank's batch; every checkpoint region inside one block (one
    #    FSDP2 unit): no segments spanning several blocks
    #    (the optimizer's state, created first, lets the budget credit what sharding it saves per rank)
    plan_opt = torch.optim.AdamW(model.parameters())
    ensure_optimizer_state(plan_opt)
    tightfit.rematerialize(
        model,
        batch,
        rank_budget(model, budget, "fsdp2", optimizer=plan_opt),
        optimizer=plan_opt,
        config=tightfit.RematConfig(segments=False),
    )
    # 3. shard: every block, then the root; the optimizer on the sharded parameters
    model = parallelize_(model, "fsdp2")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    report = tightfit.profile(model, batch, optimizer=opt, time_steps=0)  # every rank calls it
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(**batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {
        "rank": rank,
        "budget": budget,
        "peak": report.peak_bytes,
        "rank_peaks": [r.peak_bytes for r in report.ranks],
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.6, help="budget: this share of the activations")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        if torch.cuda.is_available():
            torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
        out = train(args.steps, args.fraction)
        print(
            f"rank {out['rank']}: budget {tightfit.format_size(out['budget'])}, "
            f"measured peak {tightfit.format_size(out['peak'])}, "
            f"losses {[round(x, 3) for x in out['losses']]}"
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
