"""DDP with few-bit activations and a tightfit remat plan made for one rank's memory budget.

    torchrun --standalone --nproc_per_node=2 examples/ddp_torchrun.py [--steps 5] [--fraction 0.6]

The order that works (docs/distributed.md): tightfit changes the plain model first (few-bit GELUs, then a
remat plan for the batch one rank sees), then DDP wraps it. The plan's checkpoints are non-reentrant, so
DDP needs no ``static_graph``. DDP keeps gradient buckets as large as the parameters through the step:
``rank_budget`` takes them off the budget the plain model is planned for. Each rank prints the budget
and its measured peak. On a machine without GPUs it runs on the CPU with the gloo backend.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import tightfit
from tightfit.memory.distributed import rank_budget
from tightfit.testing import TinyLM


def train(
    steps: int = 5, fraction: float = 0.6, batch_size: int = 2, seq: int = 128, layers: int = 4
) -> dict:
    """Convert, plan, wrap and train on an initialised process group; returns this rank's numbers."""
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    torch.manual_seed(0)
    model = TinyLM(layers=layers).to(device)
    g = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(0, 256, (batch_size, seq), generator=g).to(device)
    batch = {"ids": ids, "labels": torch.roll(ids, -1, dims=1)}

    tightfit.convert_(model, tightfit.FewBit(bits=2))  # 2-bit GELU backward
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # DDP keeps these parameters: one optimizer
    plain = tightfit.profile(model, batch, optimizer=opt, time_steps=0)
    budget = int(plain.baseline_bytes + fraction * (plain.peak_bytes - plain.baseline_bytes))
    budget += tightfit.memory.distributed.ddp_bucket_bytes(model)  # a per-rank budget, buckets included
    tightfit.rematerialize(model, batch, rank_budget(model, budget, "ddp"), optimizer=opt)
    ddp = DistributedDataParallel(model)
    report = tightfit.profile(ddp, batch, optimizer=opt, time_steps=0)  # every rank calls it
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = ddp(**batch)
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
