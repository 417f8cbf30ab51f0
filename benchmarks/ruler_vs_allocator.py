"""The ruler against the allocator on the LSTM language model's remat plans (CPU or CUDA).

The ruler (`tightfit.memory.LiveTracker`) is a Python TorchDispatchMode and counts the step it observes.
`tightfit.memory.allocator_peak` reads the allocator's peak of the plain step (CPU: the profiler's
allocation events; CUDA: the caching allocator's statistics). For each variant, in one process, three
peaks of one training step above its start: plain (allocator), under a no-op Python dispatch mode
(allocator: what observing alone costs) and observed by the ruler. Variants: no remat, hand-written
`checkpoint` every k time steps (as `remat_lstm.py`), and tightfit plans at budgets a fraction of the way
from its smallest feasible one to the no-remat peak.

    .venv/bin/python benchmarks/ruler_vs_allocator.py          # CPU, remat_lstm.py's size, ~6 min
    python3 benchmarks/ruler_vs_allocator.py --device cuda --results ruler_vs_allocator_h100   # H100, ~4 min

Results: benchmarks/results/<--results>.txt
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from remat_lstm import segment_checkpoint  # noqa: E402

MiB = 2**20
# (hidden, embed, batch, k) per device: remat_lstm.py's CPU and GPU configurations
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
    ap.add_argument("--results", default="ruler_vs_allocator", help="file name under benchmarks/results/")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type not in CONFIGS or (device.type == "cuda" and not torch.cuda.is_available()):
        sys.exit(f"--device must be cpu or an available cuda device, got {args.device!r}")
    torch.set_num_threads(1)
    if device.type == "cuda":  # as remat_lstm.py runs it: gradients reproducible bit for bit
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    hidden, embed, batch_size, k = CONFIGS[device.type]

    from tightfit import zoo
    from tightfit._step import call_model, loss_of
    from tightfit.memory import LiveTracker, allocator_peak
    from tightfit.remat import execute
    from tightfit.remat.auto import Planner, options_by_module

    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

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

    step()  # first calls of the kernels out of the way
    row("no remat", lambda: None, lambda: None)
    row(
        f"checkpoint every {k} steps",
        lambda: segment_checkpoint(model, k),
        lambda: model.rnn.__dict__.pop("forward", None),
    )
    t0 = time.perf_counter()
    planner = Planner(model, batch, keep_output=False)
    say(f"(tightfit measured the model in {time.perf_counter() - t0:.0f} s)")
    for fraction in args.fractions:
        budget = int(planner.min_budget + fraction * (planner.baseline_peak - planner.min_budget))
        plan = planner.plan(budget)
        options = [d.option for d in plan.decisions]
        row(
            f"tightfit {budget / 2**30:.3f} GiB" if budget > 2**30 else f"tightfit {budget / MiB:.1f} MiB",
            lambda options=options: execute.apply(model, options_by_module(planner.blocks.blocks, options)),
            lambda: execute.undo(model),
        )
    out = Path(__file__).resolve().parent / "results" / f"{args.results}.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


def _under(mode: TorchDispatchMode, fn: Callable[[], None]) -> None:
    with mode:
        fn()


if __name__ == "__main__":
    main()
