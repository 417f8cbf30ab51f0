"""The ruler against the allocator on the LSTM language model's remat plans (CPU or CUDA).

The ruler (`tightfit.memory.LiveTracker`) is a Python TorchDispatchMode and counts the step it observes.
`tightfit.memory.allocator_peak` reads the allocator's peak of the plain step (CPU: the profiler's
allocation events; CUDA: the caching allocator's statistics). For each variant, in one process, three
peaks of one training step above its start: plain (allocator), under a no-op Python dispatch mode
(allocator: what observing alone costs) and observed by the ruler. Variants: no remat, hand-written
`checkpoint` every k time steps (as `benchmarks.remat.lstm`), and tightfit plans at budgets a fraction of
the way from its smallest feasible one to the no-remat peak.

    python -m benchmarks.memory.ruler_vs_allocator     # CPU, benchmarks.remat.lstm's size, ~6 min
    python -m benchmarks.memory.ruler_vs_allocator --device cuda --results ruler_vs_allocator_h100  # ~4 min

Results: benchmarks/results/latest/<--results, default ruler_vs_allocator>.{json,txt}
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import results
from benchmarks.remat.peers import segment_checkpoint

MiB = 2**20
# (hidden, embed, batch, k) per device: benchmarks.remat.lstm's CPU and GPU configurations
CONFIGS = {"cpu": (256, 64, 8, 32), "cuda": (4096, 128, 64, 25)}


class NoopMode(TorchDispatchMode):
    """Runs every op as is: what any Python dispatch mode costs, without the ruler's bookkeeping."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        return func(*args, **(kwargs or {}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--steps", type=int, default=1000, help="time steps T")
    ap.add_argument(
        "--fractions", type=float, nargs="*", default=[0.0, 0.02, 0.1], help="tightfit budgets (see above)"
    )
    ap.add_argument("--results", default="ruler_vs_allocator", help="name of the files in results/latest/")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type not in CONFIGS or (device.type == "cuda" and not torch.cuda.is_available()):
        sys.exit(f"--device must be cpu or an available cuda device, got {args.device!r}")
    with results.Transcript() as transcript:
        rows = run(args, device)
    settings = vars(args) | {"threads": 1, "config": dict(zip(KEYS, CONFIGS[device.type]))}
    data = {"settings": settings, "rows": rows}
    results.say_written(results.write(args.results, data, device=device, text=transcript.text))


KEYS = ("hidden", "embed", "batch", "segment_steps")


def run(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Print and return each variant's three peaks."""
    torch.set_num_threads(1)
    if device.type == "cuda":  # as benchmarks.remat.lstm runs it: gradients reproducible bit for bit
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    hidden, embed, batch_size, k = CONFIGS[device.type]

    from tightfit import zoo
    from tightfit._step import call_model, loss_of
    from tightfit.memory import LiveTracker, allocator_peak
    from tightfit.remat import Planner, RematConfig, execute

    rows: list[dict] = []

    def say(text: str) -> None:
        print(text, flush=True)

    model_f, batch_f = zoo.get("lstm")
    torch.manual_seed(0)
    model = model_f(vocab_size=64, embed_dim=embed, hidden_size=hidden, num_layers=2, device=device).train()
    batch = batch_f(batch_size=batch_size, seq_len=args.steps, vocab_size=64, device=device)
    on = torch.cuda.get_device_name() if device.type == "cuda" else "1 CPU thread"
    say(f"zoo lstm 2x LSTMCell({embed}->{hidden}), vocab 64, B={batch_size}, T={args.steps}, on {on}")
    say("peak of one training step above its start (MiB): plain (allocator) / under a no-op dispatch mode")
    say("(allocator) / observed by the ruler; ruler / plain")

    def step() -> None:
        loss_of(call_model(model, batch), None).backward()  # the output is freed, as the planner counts it

    def zero_grads() -> None:
        for p in model.parameters():
            p.grad = None

    def readings() -> tuple[float, float, float]:
        zero_grads()
        plain = allocator_peak(step, device)
        zero_grads()
        with_mode = allocator_peak(lambda: _under(NoopMode(), step), device)
        zero_grads()
        with LiveTracker(track=[model, batch]) as tracker:
            step()
        zero_grads()
        return plain / MiB, with_mode / MiB, (tracker.peak - tracker.baseline) / MiB

    def row(name: str, apply: Callable[[], None], undo: Callable[[], None]) -> None:
        apply()
        try:
            plain, with_mode, ruler = readings()
        finally:
            undo()
        say(f"{name:<34} {plain:10.2f} {with_mode:10.2f} {ruler:10.2f}   x{ruler / plain:.3f}")
        rows.append(
            {
                "variant": name,
                "plain_allocator_mib": plain,
                "noop_mode_allocator_mib": with_mode,
                "ruler_mib": ruler,
                "ruler_over_plain": ruler / plain,
            }
        )

    step()  # first calls of the kernels out of the way
    row("no remat", lambda: None, lambda: None)
    row(
        f"checkpoint every {k} steps",
        lambda: segment_checkpoint(model, k),
        lambda: model.rnn.__dict__.pop("forward", None),
    )
    t0 = time.perf_counter()
    planner = Planner(model, batch, config=RematConfig(keep_output=False))
    say(f"(tightfit measured the model in {time.perf_counter() - t0:.0f} s)")
    for fraction in args.fractions:
        budget = int(planner.min_budget + fraction * (planner.baseline_peak - planner.min_budget))
        plan = planner.plan(budget)
        row(
            f"tightfit {budget / 2**30:.3f} GiB" if budget > 2**30 else f"tightfit {budget / MiB:.1f} MiB",
            lambda plan=plan: execute.apply(model, plan.options, compile_budget=plan.compile_budget),
            lambda: execute.undo(model),
        )
        rows[-1]["budget_bytes"] = budget
    return rows


def _under(mode: TorchDispatchMode, fn: Callable[[], None]) -> None:
    with mode:
        fn()


if __name__ == "__main__":
    main()
