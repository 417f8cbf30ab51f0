"""The ruler against the CUDA caching allocator on a tightfit LSTM plan (needs a CUDA device).

The ruler (`tightfit.memory.LiveTracker`, a TorchDispatchMode) counts live tensor storages. On CUDA the
allocator also counts its allocations, so the two can be compared on the same steps of one plan
(`remat_lstm.py`'s GPU configuration, planned for `--budget`):

1. op by op in one observed step: the ruler's live bytes against `torch.cuda.memory_allocated()` after every
   op (both above the step's start);
2. the allocator's peak of the step with the plan: plain, under a no-op Python TorchDispatchMode, and under
   the ruler; then the same with the plan's singly checkpointed block calls stored instead.

    python3 benchmarks/ruler_vs_allocator.py --budget 3.93GiB   # H100: ~3 min; results/ruler_vs_allocator.txt
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MiB = 2**20


class NoopMode(TorchDispatchMode):
    """Runs every op as is: what any Python dispatch mode costs, without the ruler's bookkeeping."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        return func(*args, **(kwargs or {}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="3.93GiB", help="tightfit budget of the plan compared")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--embed", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--results", default="ruler_vs_allocator", help="file name under benchmarks/results/")
    args = ap.parse_args(argv)
    if not (args.device.startswith("cuda") and torch.cuda.is_available()):
        sys.exit("ruler_vs_allocator.py compares against the CUDA caching allocator: it needs a CUDA device")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)

    from tightfit import zoo
    from tightfit._step import call_model, loss_of
    from tightfit.memory.live import LiveTracker
    from tightfit.remat import execute
    from tightfit.remat.auto import Planner
    from tightfit.remat.execute import RECOMPUTE, STORE

    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    model_f, batch_f = zoo.get("lstm")
    model = model_f(
        vocab_size=64, embed_dim=args.embed, hidden_size=args.hidden, num_layers=2, device=args.device
    ).train()
    batch = batch_f(batch_size=args.batch, seq_len=args.steps, vocab_size=64, device=args.device)
    planner = Planner(model, batch, keep_output=False)
    plan = planner.plan(args.budget)
    options = [d.option for d in plan.decisions]
    say(
        f"zoo lstm 2x LSTMCell({args.embed}->{args.hidden}), B={args.batch}, T={args.steps} on "
        f"{torch.cuda.get_device_name()}; plan for {args.budget}: {options.count(RECOMPUTE)} calls "
        f"checkpointed singly, {options.count(STORE)} stored, {len(plan.checkpointed)} checkpointed in all"
    )

    # 1. op by op, in one step observed by the ruler (the planner's own measured step)
    samples: list[tuple[int, int]] = []
    sample = LiveTracker._sample

    def sampling(self: LiveTracker, op: str) -> None:
        sample(self, op)
        samples.append((self.current, torch.cuda.memory_allocated()))

    execute.apply(planner.model, planner._options(options))
    LiveTracker._sample = sampling  # type: ignore[method-assign]
    try:
        planner._tracked_step()
    finally:
        LiveTracker._sample = sample  # type: ignore[method-assign]
    (r0, a0) = samples[0]
    gaps = [(r - r0) - (a - a0) for r, a in samples]
    say(
        f"1. one observed step, {len(samples)} ops: ruler peak {(max(r for r, _ in samples) - r0) / MiB:.2f} "
        f"MiB, memory_allocated peak at the same ops {(max(a for _, a in samples) - a0) / MiB:.2f} MiB; "
        f"ruler minus allocator after any op: {min(gaps) / MiB:+.2f} to {max(gaps) / MiB:+.2f} MiB"
    )

    # 2. the allocator's peak of whole steps
    def allocator_peak(context: Callable[[], contextlib.AbstractContextManager]) -> float:
        for p in planner.model.parameters():
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with context():
            loss = loss_of(call_model(planner.model, batch), None)  # the output is freed (keep_output=False)
            loss.backward()
            del loss
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / MiB

    contexts = {
        "plain": contextlib.nullcontext,
        "no-op dispatch mode": NoopMode,
        "ruler": lambda: LiveTracker(track=[planner.model, batch]),
    }
    stored = [STORE if o == RECOMPUTE else o for o in options]
    for name, variant in (("the plan", options), ("singly checkpointed calls stored", stored)):
        execute.undo(planner.model)
        execute.apply(planner.model, planner._options(variant))
        peaks = {ctx: allocator_peak(make) for ctx, make in contexts.items()}
        say(f"2. {name}: allocator peak above start, " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()))
    execute.undo(planner.model)
    out = Path(__file__).resolve().parent / "results" / f"{args.results}.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
