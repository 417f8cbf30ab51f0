"""Offload against the peers on a GPT-2-medium-sized and a Llama-style model, bf16 autocast, one process.

Every variant is a deep copy of the same model, stepped the same way (grads to None, forward, loss,
backward; no optimizer). The model is wrapped in a module whose forward runs under bf16 autocast, so every
forward casts the weights afresh (as a training loop does) and planners measure the same ops they run:

  plain            no offload, no recompute (the baseline of every ratio)
  save_on_cpu      torch.autograd.graph.save_on_cpu(pin_memory=True) around the forward
  hf_offload       Hugging Face's activation_checkpointing_enable(offload=True) (checkpoint + save_on_cpu)
  recompute        tightfit.rematerialize at the ruler peak the Offload variant reached (equal peak)
  offload          tightfit.convert_(model, tightfit.Offload()) on every block
  mixed            tightfit.plan(..., allow=("recompute", "offload")) at the same budget, where the planner
                   offers offload (else the row records why not)

Per variant: device peak from the allocator (``torch.cuda.max_memory_allocated`` above what was allocated
before the step) and the step's absolute peak from the ruler (`tightfit.memory.LiveTracker`; per device
where the ruler reports ``peak_by_device``), host bytes (Offload's pool; the ruler's host peak for the
others), the bytes Offload moved, the step time (median of interleaved rounds) with the paired ratio to
``plain`` round by round, and a torch.equal check of every gradient against ``plain`` with the same seed
(dropout on). The issue's targets are checked and printed: Offload keeps >= 90% of the bytes it moved off
the device peak at <= x1.05 step time; the mixed plan is no slower than recompute at no higher peak.

    python -m benchmarks.offload.gpt2_llama                 # on a GPU: gpt2-medium and llama-1b
    python -m benchmarks.offload.gpt2_llama --dry-run       # CPU: tiny models, simulated target (~1 min)

Results: benchmarks/results/latest/offload_<model>.{json,csv,txt} (``_cpu_dryrun`` for a dry run; set
``TIGHTFIT_BENCH_RESULTS=<dir>`` for trial runs).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import tightfit
import tightfit.memory
from benchmarks.common import results
from benchmarks.common.steps import Autocast, grads
from benchmarks.common.timing import interleaved, median, paired_summary, timed
from tightfit._step import forward_loss
from tightfit.memory import LiveTracker
from tightfit.offload import Offload, SimulatedTarget, offloader_of
from tightfit.sizes import format_size

VARIANTS = ("plain", "save_on_cpu", "hf_offload", "recompute", "offload", "mixed")
# offload is built before recompute and mixed: its measured device peak is their budget
BUILD_ORDER = ("plain", "offload", "save_on_cpu", "hf_offload", "recompute", "mixed")
# (zoo name, batch, seq) on a GPU and for the CPU dry run
GPU_MODELS = {"gpt2-medium": (8, 1024), "llama-1b": (4, 2048)}
DRY_MODELS = {"gpt2-medium-tiny": (2, 64), "llama-1b-tiny": (2, 64)}
MiB = 2**20


def offload_config(dry: bool) -> Offload:
    """The library default on a GPU; in the dry run every size moves (the tiny models' tensors are small)."""
    return Offload(min_bytes=0) if dry else Offload()


@dataclass
class Variant:
    name: str
    model: torch.nn.Module | None = None
    wrap: Callable[[], Any] = contextlib.nullcontext  # context around the forward
    error: str | None = None
    row: dict[str, Any] = field(default_factory=dict)


def log(msg: str) -> None:
    print(msg, flush=True)


def step_fn(v: Variant, batch: Any, keep_grads: bool = False) -> Callable[[], None]:
    """One step; the gradients are dropped at its end unless ``keep_grads`` (only one variant holds
    gradients at a time, so the copies of a 1B model fit one GPU)."""

    def step() -> None:
        for p in v.model.parameters():  # type: ignore[union-attr]
            p.grad = None
        with v.wrap():
            loss = forward_loss(v.model, batch)  # type: ignore[arg-type]
        loss.backward()
        if not keep_grads:
            for p in v.model.parameters():  # type: ignore[union-attr]
                p.grad = None

    return step


def seeded_grads(v: Variant, batch: Any, device: torch.device) -> list[torch.Tensor | None]:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(1234)
        step_fn(v, batch, keep_grads=True)()
    return grads(list(v.model.parameters()))  # type: ignore[union-attr]


def allocator_peak(step: Callable[[], None], device: torch.device) -> int | None:
    """The allocator's peak during one step above what was allocated before it (activations, gradients,
    temporaries: every variant's parameters live on the device at once, so absolute peaks would all
    carry the other copies)."""
    if device.type != "cuda":
        return None
    gc.collect()
    return tightfit.memory.allocator_peak(step, device)


def ruler(v: Variant, batch: Any, step: Callable[[], None], device: torch.device) -> dict[str, Any]:
    gc.collect()
    off = offloader_of(v.model)
    pool = off.pool.free_buffers() if off is not None else []
    with LiveTracker(track=[v.model, batch, pool]) as t:
        step()
    by_device = t.peak_by_device
    return {
        "ruler_peak": int(t.peak),
        "ruler_peak_by_device": {str(k): int(n) for k, n in by_device.items()},
        "ruler_device_peak": int(by_device.get(str(device), by_device.get(device.type, t.peak))),
        "ruler_host_peak": int(by_device.get("cpu", 0)) if device.type != "cpu" else None,
    }


def build_variant(name: str, base: torch.nn.Module, batch: Any, device: torch.device, dry: bool,
                  budget: int | None) -> Variant:
    v = Variant(name)
    inner = copy.deepcopy(base)
    if name == "hf_offload":
        enable = getattr(inner, "activation_checkpointing_enable", None)
        if enable is None:
            raise RuntimeError("this transformers has no activation_checkpointing_enable(offload=True)")
        enable(offload=True)
    model: torch.nn.Module = Autocast(inner, device.type, torch.bfloat16)
    if name in ("plain", "hf_offload"):
        pass
    elif name == "save_on_cpu":
        pin = device.type == "cuda"
        v.wrap = lambda: torch.autograd.graph.save_on_cpu(pin_memory=pin)
    elif name == "offload":
        target = SimulatedTarget() if dry else None
        tightfit.convert_(model, offload_config(dry), target=target)
    elif name == "recompute":
        if budget is None:
            raise RuntimeError("no budget: the offload variant did not run")
        model = tightfit.rematerialize(model, batch, budget=budget)
    elif name == "mixed":
        if budget is None:
            raise RuntimeError("no budget: the offload variant did not run")
        plan = tightfit.plan(model, batch, budget, allow=("recompute", "offload"))
        model = plan.apply_(model)
    else:
        raise ValueError(f"unknown variant {name!r}; valid: {VARIANTS}")
    v.model = model
    return v


def run_model(zoo_name: str, batch_size: int, seq: int, device: torch.device, dry: bool, rounds: int,
              variants: tuple[str, ...]) -> dict[str, Any]:
    model_factory, batch_factory = tightfit.zoo.get(zoo_name)
    base = model_factory(device=device)
    base.train()
    batch = batch_factory(batch_size=batch_size, seq_len=seq, device=device)
    log(f"== {zoo_name}: B={batch_size} T={seq} on {results.device_name(device)}"
        f"{' (dry run: simulated offload target, no memory saved)' if dry else ''}")
    built: dict[str, Variant] = {}
    order = [n for n in BUILD_ORDER if n in variants]
    budget = None
    for name in order:
        try:
            v = build_variant(name, base, batch, device, dry, budget)
            step = step_fn(v, batch)
            step()  # warm up (allocator, pool, autotuning)
            v.row.update(ruler(v, batch, step, device))
            v.row["allocator_peak"] = allocator_peak(step, device)
            off = offloader_of(v.model)
            if off is not None:
                off.reset_stats()
                step()
                v.row["offloaded_bytes"] = off.stats.offloaded_bytes
                v.row["kept_bytes"] = off.stats.kept_bytes
                v.row["host_bytes"] = off.host_bytes
                # the budget of recompute and mixed: the device peak Offload reached (the ruler's own
                # number for the device, which leaves out the pinned host pool)
                budget = v.row["ruler_device_peak"]
                v.row["budget_for_recompute"] = budget
            else:
                v.row["host_bytes"] = v.row.get("ruler_host_peak")
        except Exception as exc:  # noqa: BLE001 - one variant failing must not lose the others
            v = Variant(name, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            log(f"   {name}: not run: {v.error}")
            if dry:
                traceback.print_exc(limit=3)
        built[name] = v
    ready = [v for v in built.values() if v.model is not None]
    plain = built.get("plain")
    if plain is not None and plain.model is not None:
        ref = seeded_grads(plain, batch, device)
        for v in ready:
            got = seeded_grads(v, batch, device)
            v.row["grads_equal"] = len(got) == len(ref) and all(
                (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                for a, b in zip(ref, got)
            )
            for p in v.model.parameters():
                p.grad = None
        del ref
    steps = {v.name: step_fn(v, batch) for v in ready}
    times = interleaved(ready, lambda v: timed(steps[v.name]), rounds, warmup=1, log=log)
    for v, ts in zip(ready, times):
        v.row["time_s"] = median(ts)
        v.row["times_s"] = ts
    if plain is not None and plain.model is not None:
        base_times = plain.row["times_s"]
        for v in ready:
            v.row.update(paired_summary(v.row["times_s"], base_times))
    rows = []
    for name in order:
        v = built[name]
        rows.append({"model": zoo_name, "variant": name, "error": v.error, **v.row})
    check = targets(built)
    print_rows(rows)
    for line in check["lines"]:
        log(line)
    return {"model": zoo_name, "batch": batch_size, "seq": seq, "rows": rows, "targets": check}


def targets(built: dict[str, Variant]) -> dict[str, Any]:
    plain, off = built.get("plain"), built.get("offload")
    out: dict[str, Any] = {"lines": []}
    if plain is None or off is None or plain.model is None or off.model is None:
        out["lines"].append("targets: not checked (plain or offload did not run)")
        return out
    moved = off.row.get("offloaded_bytes") or 0
    key = "allocator_peak" if off.row.get("allocator_peak") is not None else "ruler_device_peak"
    freed = plain.row[key] - off.row[key]
    frac = freed / moved if moved else None
    ratio = off.row.get("paired_ratio_median")
    out.update({"peak_key": key, "moved_bytes": moved, "freed_at_peak": freed, "fraction_off_peak": frac,
                "time_ratio": ratio,
                "met": frac is not None and frac >= 0.9 and ratio is not None and ratio <= 1.05})
    out["lines"].append(
        f"target (>= 90% of moved bytes off the {key}, <= x1.05 time): moved {format_size(moved)}, "
        f"peak lower by {format_size(freed)} ({'n/a' if frac is None else f'{frac:.1%}'}), time x{ratio} "
        f"-> {'met' if out['met'] else 'NOT met'}"
    )
    rec, mixed = built.get("recompute"), built.get("mixed")
    if rec is not None and rec.model is not None and mixed is not None and mixed.model is not None:
        out["mixed_vs_recompute"] = {
            "time": (mixed.row["time_s"], rec.row["time_s"]),
            "peak": (mixed.row[key], rec.row[key]),
            "met": mixed.row["time_s"] <= rec.row["time_s"] and mixed.row[key] <= rec.row[key],
        }
        out["lines"].append(f"mixed vs recompute (time, {key}): {out['mixed_vs_recompute']}")
    return out


def print_rows(rows: list[dict[str, Any]]) -> None:
    def mib(x: Any) -> str:
        return "-" if x is None else f"{x / MiB:9.1f}"

    log(f"{'variant':12} {'alloc MiB':>10} {'ruler MiB':>10} {'host MiB':>9} {'moved MiB':>10} "
        f"{'time s':>8} {'x plain':>8} {'grads':>6}")
    for r in rows:
        if r["error"]:
            log(f"{r['variant']:12} not run: {r['error']}")
            continue
        log(f"{r['variant']:12} {mib(r.get('allocator_peak')):>10} {mib(r.get('ruler_device_peak')):>10} "
            f"{mib(r.get('host_bytes')):>9} {mib(r.get('offloaded_bytes')):>10} {r['time_s']:8.4f} "
            f"{r.get('paired_ratio_median', '-'):>8} {'equal' if r.get('grads_equal') else 'DIFF':>6}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models, simulated offload target")
    ap.add_argument("--models", nargs="*", default=None, help="zoo names (default: per mode)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7 on GPU, 3 dry)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --dry-run for the CPU dry run")
    device = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
    models = DRY_MODELS if dry else GPU_MODELS
    chosen = args.models or list(models)
    rounds = args.rounds or (3 if dry else 7)
    for name in chosen:
        b, t = models.get(name, (2, 64))
        b, t = args.batch or b, args.seq or t
        with results.Transcript() as tr:
            out = run_model(name, b, t, device, dry, rounds, tuple(args.variants))
        if args.no_write:
            continue
        settings = {"batch": b, "seq": t, "rounds": rounds, "dry_run": dry, "autocast": "bfloat16",
                    "variants": list(args.variants), "offload_config": offload_config(dry).to_dict()}
        tag = name.replace("-tiny", "") + ("_cpu_dryrun" if dry else "")
        paths = results.write(f"offload_{tag}", {"settings": settings, **out}, device=device,
                              csv_rows=[{k: v for k, v in r.items() if k not in ("times_s",
                                                                                  "ruler_peak_by_device")}
                                        for r in out["rows"]],
                              text=tr.text)
        results.say_written(paths)


if __name__ == "__main__":
    main()
