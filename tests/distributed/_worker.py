"""What each of the 2 gloo ranks runs for tests/distributed (one process group for every check).

For each data-parallel wrapper (DDP, FSDP2) and each technique (few-bit, sketch, a remat plan for a
per-rank budget) a rank: builds the same model (seed 0), applies the technique to the plain model, keeps
a plain copy as the one-process reference, wraps the model, and records
- the gradients of one step on its half of the batch (all-gathered for FSDP2), against the reference run
  in this process on each half under the seed that half's rank used, averaged as the wrapper averages
  (bit for bit), and against the reference on the whole batch (close: another reduction order);
- the ruler's peak of the wrapped step (``tightfit.profile``) and the allocator's (profiler memory
  events) of the same plain step (the lowest of three: gloo's own thread allocates staging buffers
  that overlap the step's peak or not, by timing);
- for the remat plan: the per-rank budget and the measured peak;
- for FSDP2, a budget below the plain step's peak and above the sharded step's: the budget the plain
  model is planned for (``rank_budget``) and the planned, sharded step's peak.
Then it runs the two torchrun examples' ``train`` functions. Results go to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import tightfit
from tightfit.errors import UserError
from tightfit.memory import LiveTracker, allocator_peak, ensure_optimizer_state
from tightfit.memory.distributed import check_unwrapped, parallelize_, rank_budget
from tightfit.testing import TinyLM

ROOT = Path(__file__).resolve().parents[2]
BATCH, SEQ, VOCAB = 2, 64, 128  # per rank
SEED = 100  # rank r draws its random numbers (sketches) under SEED + r



def make_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(vocab=VOCAB, d=32, layers=2)


def full_batch(world: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (world * BATCH, SEQ), generator=g)
    return {"ids": ids, "labels": torch.roll(ids, -1, dims=1)}


def shard(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    return {k: v[rank * BATCH : (rank + 1) * BATCH] for k, v in batch.items()}


def grads_of(model: nn.Module, batch: dict[str, torch.Tensor], seed: int) -> list[torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    model(**batch).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    return grads


def step_fn(model: nn.Module, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer, seed: int):
    def step() -> None:
        torch.manual_seed(seed)
        loss = model(**batch)
        loss.backward()
        opt.step()
        del loss

    return step


def max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).norm() / y.norm().clamp_min(1e-30)).item() for x, y in zip(a, b))


def apply(technique: str, model: nn.Module, local: dict, budget: int | None, parallel: str) -> None:
    if technique == "fewbit":
        report = tightfit.convert_(model, tightfit.FewBit(bits=2))
        assert report.converted, "few-bit converted nothing"
    elif technique == "sketch":
        report = tightfit.convert_(model, tightfit.Sketch(ratio=0.5))
        assert report.converted, "sketch converted nothing"
    elif technique == "remat":
        plan_opt = torch.optim.AdamW(model.parameters())
        ensure_optimizer_state(plan_opt)  # rank_budget counts the state FSDP2 shards
        # FSDP2: every checkpoint region inside one block, which is one fully_shard unit. Block times from
        # FLOP counts, not clocks: every run and every rank makes the same plan (with measured times the
        # plan, and with it the observed step's peak, varied from run to run)
        config = tightfit.RematConfig(segments=parallel != "fsdp2", flop_rate=1e10)
        tightfit.rematerialize(
            model,
            local,
            rank_budget(model, budget, parallel, optimizer=plan_opt),
            optimizer=plan_opt,
            config=config,
        )


def check_fsdp2_budget(rank: int, world: int) -> dict:
    """A budget below the plain step's peak and above the sharded step's: the plain model is planned for
    ``rank_budget`` (more than the budget: sharding's credit), then sharded; each rank's peak measured."""
    local = shard(full_batch(world), rank)
    torch.manual_seed(0)
    # blocks small beside the whole model: sharding saves more than it gathers
    model = TinyLM(vocab=VOCAB, d=64, layers=4)
    plain = tightfit.profile(model, local, optimizer=torch.optim.AdamW(model.parameters()), time_steps=0)
    sharded_model = parallelize_(copy.deepcopy(model), "fsdp2")
    sharded_opt = torch.optim.AdamW(sharded_model.parameters())
    sharded = tightfit.profile(sharded_model, local, optimizer=sharded_opt, time_steps=0)
    del sharded_model, sharded_opt
    # every rank plans for the same budget: the largest of the ranks' (their batches differ)
    peaks = torch.tensor([plain.peak_bytes, sharded.peak_bytes])
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    plain_peak, sharded_peak = (int(x) for x in peaks)
    budget = int(sharded_peak + 0.15 * (plain_peak - sharded_peak))
    plan_opt = torch.optim.AdamW(model.parameters())
    ensure_optimizer_state(plan_opt)
    planned_for = rank_budget(model, budget, "fsdp2", optimizer=plan_opt)
    config = tightfit.RematConfig(segments=False, flop_rate=1e10)
    tightfit.rematerialize(model, local, planned_for, optimizer=plan_opt, config=config)
    model = parallelize_(model, "fsdp2")
    report = tightfit.profile(model, local, optimizer=torch.optim.AdamW(model.parameters()), time_steps=0)
    return {
        "plain_peak": plain_peak,
        "sharded_peak": sharded_peak,
        "budget": budget,
        "planned_for": planned_for,
        "peak": report.peak_bytes,
    }


def check(parallel: str, technique: str, rank: int, world: int) -> dict:
    batch = full_batch(world)
    local = shard(batch, rank)
    model = make_model()
    out: dict = {}
    budget = None
    if technique == "remat":
        plain = tightfit.profile(model, local, optimizer=torch.optim.AdamW(model.parameters()), time_steps=0)
        planned = int(plain.baseline_bytes + 0.6 * (plain.peak_bytes - plain.baseline_bytes))
        # the budget whose rank budget is `planned` (DDP: plus the buckets; FSDP2: the same, for this
        # model of two large blocks, whose gathered units outweigh the credit for sharding)
        credit_opt = torch.optim.AdamW(model.parameters())
        ensure_optimizer_state(credit_opt)
        budget = planned - rank_budget(model, 0, parallel, optimizer=credit_opt)
        out["budget"] = budget
    apply(technique, model, local, budget, parallel)
    reference = copy.deepcopy(model)
    if (parallel, technique) == ("ddp", "fewbit"):  # the plain per-rank step, for DDP's buckets
        plain_opt = torch.optim.AdamW(reference.parameters())
        out["plain_peak"] = tightfit.profile(reference, local, optimizer=plain_opt, time_steps=0).peak_bytes

    per_rank = [grads_of(reference, shard(batch, r), SEED + r) for r in range(world)]
    averaged = [sum(g[i] / world for g in per_rank) for i in range(len(per_rank[0]))]
    whole = grads_of(reference, batch, SEED)

    model = parallelize_(model, parallel)
    try:
        check_unwrapped(model)
        out["refuses_wrapped"] = False
    except UserError as e:
        out["refuses_wrapped"] = "apply tightfit to the plain model first" in str(e)
    torch.manual_seed(SEED + rank)
    model(**local).backward()
    grads = []
    for p in model.parameters():
        g = p.grad
        grads.append(g.full_tensor() if hasattr(g, "full_tensor") else g.detach().clone())
    model.zero_grad(set_to_none=True)
    # a second step: DDP rebuilds its buckets in the order of the first backward, at the second forward
    model(**local).backward()
    model.zero_grad(set_to_none=True)
    out["exact"] = all(torch.equal(a, b) for a, b in zip(grads, averaged))
    out["rel_per_rank"] = max_rel(grads, averaged)
    out["rel_whole"] = max_rel(grads, whole)

    opt = torch.optim.AdamW(model.parameters())
    ensure_optimizer_state(opt)
    state_before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(SEED + rank)
    rng_before = torch.get_rng_state()
    report = tightfit.profile(model, local, optimizer=opt, time_steps=1)
    out["restored"] = torch.equal(torch.get_rng_state(), rng_before) and all(
        torch.equal(a, b) for a, b in zip(state_before, (p.detach() for p in model.parameters()))
    )
    out["ruler"] = report.peak_bytes - report.baseline_bytes
    out["peak"] = report.peak_bytes
    out["peak_by_device"] = report.peak_by_device
    out["ranks"] = [r.rank for r in report.ranks]
    out["rank_peaks"] = [r.peak_bytes for r in report.ranks]
    out["rank_peaks_by_device"] = [r.peak_by_device for r in report.ranks]
    # The ruler and the allocator read the same step, three times: an FSDP2 step's peak depends on when
    # gloo's asynchronous collectives complete (it varies from run to run), and gloo stages some data in
    # buffers of its own thread, which the allocator (process-wide) sees when they overlap the peak
    pairs = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        tracker = LiveTracker(track=[model, opt, local])
        step = step_fn(model, local, opt, SEED + rank)

        def observed(tracker: LiveTracker = tracker, step=step) -> None:  # noqa: ANN001
            with tracker:
                step()

        allocated = allocator_peak(observed)
        pairs.append((tracker.peak - tracker.baseline, allocated))
    out["ruler_allocator_runs"] = pairs
    return out


def run_example(name: str) -> dict:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.train(steps=2, seq=64, fraction=0.8, layers=2)


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict = {}
    try:
        for parallel in ("ddp", "fsdp2"):
            for technique in ("fewbit", "sketch", "remat"):
                key = f"{parallel}/{technique}"
                start = time.perf_counter()
                try:
                    results[key] = check(parallel, technique, rank, world)
                except Exception:
                    results[key] = {"error": traceback.format_exc()}
                results[key]["seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        try:
            results["fsdp2/rank_budget"] = check_fsdp2_budget(rank, world)
        except Exception:
            results["fsdp2/rank_budget"] = {"error": traceback.format_exc()}
        results["fsdp2/rank_budget"]["seconds"] = time.perf_counter() - start
        for name in ("ddp_torchrun", "fsdp2_torchrun"):
            start = time.perf_counter()
            try:
                results[f"example/{name}"] = run_example(name)
            except Exception:
                results[f"example/{name}"] = {"error": traceback.format_exc()}
            results[f"example/{name}"]["seconds"] = time.perf_counter() - start
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover - run by tests/distributed/test_distributed.py
    run(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
