"""LSTM language model over 1000 time steps: activation memory -95% at <= +33% step time? (Gruslys et al.)

Gruslys et al. (2016, "Memory-Efficient Backpropagation Through Time") report saving 95% of the memory of
BPTT on sequences of length 1000 for about a third more time per iteration. Here the zoo LSTM LM (an explicit
`nn.LSTMCell` loop over time, dropout 0.1 on) with a small hidden size runs over T=1000 steps, and we measure,
in one process, side by side:

  no remat | tightfit.rematerialize at budgets from its smallest feasible one up, and at each peer's peak |
  segment checkpointing
  (PyTorch's `checkpoint` over every k consecutive time steps via the model's `rnn.run`, k ~ sqrt(T) is the
  classic choice)

"activation memory" = live bytes above params/buffers/batch when the forward returns (what is kept for the
backward, loss included); we also give the exact peak of the whole step (grads count) above params. The
part no time-step remat can drop (embedding output, stacked LSTM outputs, logits; computed from the shapes)
is shown as the floor, and "above floor" is the activation memory minus it: the memory of backpropagation
through time itself, which is what Gruslys et al. reduce.

    python -m benchmarks.remat.lstm                              # T=1000, H=256, B=8, ~3-5 min
    python -m benchmarks.remat.lstm --reuse-planner --rounds 9   # the published CPU table (remat_lstm)
    python -m benchmarks.remat.lstm --hidden 512 --embed 128 --batch 16 --segments 32 \\
        --extra-budgets 1 --rounds 3 --reuse-planner --results remat_lstm_h512   # matmul-bound, ~15 min
    python -m benchmarks.remat.lstm --device cuda --hidden 4096 --embed 128 --batch 64 --segments 25 40 \\
        --extra-budgets 0 --rounds 5 --reuse-planner --results remat_lstm_h100  # GPU-bound on an H100

On CUDA, deterministic algorithms are switched on (gradients are compared bit for bit) and each row also
gets the caching allocator's peak of one step, beside the ruler's.

Results: benchmarks/results/latest/<--results, default remat_lstm>.{json,csv,png} (and the JSON in history/).
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from benchmarks.common import results
from benchmarks.common.steps import MiB, fresh_copy, reference_grads, run_step, tensors_of
from benchmarks.remat.harness import (
    Variant,
    meta_conditions,
    print_table,
    target_check,
    time_interleaved,
    write_results,
)
from benchmarks.remat.peers import segment_checkpoint
from benchmarks.remat.workload import (
    Workload,
    add_tightfit_rows,
    finish,
    log,
    share_planner,
    timed_min_budget,
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="time steps T")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--embed", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=64, help="character-level sized vocabulary")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--segments", type=int, nargs="*", default=None, help="peer segment lengths k")
    ap.add_argument("--extra-budgets", type=int, default=3, help="evenly spaced tightfit budgets to add")
    ap.add_argument(
        "--fractions",
        type=float,
        nargs="*",
        default=[0.05],
        help="also budget params + grads + this fraction of the no-remat peak's rest (0.05: -95%%)",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, ...")
    ap.add_argument("--results", default="remat_lstm", help="name of the files in results/latest/")
    ap.add_argument(
        "--reuse-planner", action="store_true", help="measure the model once, then solve + verify per budget"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        # gradients are compared bit for bit: CUDA's embedding backward and cuBLAS's split-K reductions are
        # not deterministic by default (two identical steps differ in the last bits)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    T = args.steps
    if args.segments is None:
        args.segments = sorted({10, round(math.sqrt(T)), 100} - {0})

    from tightfit import zoo

    model_f, batch_f = zoo.get("lstm")
    model = model_f(
        vocab_size=args.vocab,
        embed_dim=args.embed,
        hidden_size=args.hidden,
        num_layers=args.layers,
        device=args.device,
    ).train()
    batch = batch_f(batch_size=args.batch, seq_len=T, vocab_size=args.vocab, device=args.device)
    on = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{args.threads} CPU thread(s)"
    desc = (
        f"zoo lstm: {args.layers}x LSTMCell({args.embed}->{args.hidden}), vocab {args.vocab}, "
        f"B={args.batch}, T={T}, dropout 0.1, on {on}"
    )
    w = Workload("lstm", model, batch, [], desc=desc)
    floor = 4 * args.batch * T * (args.embed + args.hidden + 2 * args.vocab)
    log(f"== {desc}; floor (embedding out + LSTM outputs + logits + log-softmax) ~ {floor / MiB:.1f} MiB")

    seed = 0
    ref_model, ref_params, ref_bufs = fresh_copy(model)
    ref_names = ([n for n, _ in ref_model.named_parameters()], [n for n, _ in ref_model.named_buffers()])
    ref = reference_grads(run_step(ref_model, batch), ref_params, seed, ref_bufs)
    del ref_model

    rows: list[Variant] = []
    m, p, bf = fresh_copy(model)
    rows.append(
        Variant("no remat", "baseline", run_step(m, batch), p, tensors_of(m) + tensors_of(batch), buffers=bf)
    )
    for k in args.segments:
        m, p, bf = fresh_copy(model)
        segment_checkpoint(m, k)
        rows.append(
            Variant(
                f"ckpt every {k} steps",
                "ckpt-segments",
                run_step(m, batch),
                p,
                tensors_of(m) + tensors_of(batch),
                k,
                buffers=bf,
            )
        )
    for v in rows:
        finish(v, ref, seed)
    base = rows[0]

    if args.reuse_planner:
        share_planner(w)
    min_b = timed_min_budget(w)
    lo = min_b if min_b is not None else min(v.peak for v in rows)
    # budgets keeping a fraction of what the no-remat peak holds beyond params + grads (0.05: -95%)
    targets = {base.params_bytes * 2 + int(f * (base.peak - 2 * base.params_bytes)) for f in args.fractions}
    budgets = sorted(
        {
            lo,
            base.peak,
            *(
                int(lo + (base.peak - lo) * (i + 1) / (args.extra_budgets + 1))
                for i in range(args.extra_budgets)
            ),
        }
        | {b for b in targets if b > lo}
        | {v.peak for v in rows[1:] if v.peak >= lo}  # each hand-written variant's peak: equal-peak rows
    )
    plan_times = add_tightfit_rows(w, budgets, rows, ref, ref_names, seed)

    log(f"timing {len(rows)} variants, {args.rounds} interleaved rounds ...")
    time_interleaved(rows, args.rounds, warmup=1, log=log)
    title = f"lstm: {desc}; {args.rounds} rounds"
    print_table(rows, base, title)
    checks = target_check(rows, base)

    from rich.console import Console
    from rich.table import Table

    t = Table(title="Gruslys et al. headline: activation memory -95% at <= +33% step time")
    for c in (
        "variant",
        "after-fw MiB",
        "act. memory vs no remat",
        "above floor vs no remat",
        "peak above params MiB",
        "peak vs no remat",
        "time ratio",
        "grads",
        "meets -95% / x1.33",
        *(["peak above start: ruler / CUDA allocator MiB"] if base.allocator_peak is not None else []),
    ):
        t.add_column(c, justify="left" if c == "variant" else "right")
    headline = []
    for v in rows:
        act = v.after_forward / base.after_forward - 1
        recurrent = (v.after_forward - floor) / (base.after_forward - floor) - 1
        pk = v.peak_above_params / base.peak_above_params - 1
        ratio = v.median / base.median
        ok = act <= -0.95 and ratio <= 1.33 and bool(v.grads_equal)
        headline.append(
            {
                "name": v.name,
                "activation_change": round(act, 4),
                "above_floor_change": round(recurrent, 4),
                "peak_above_params_change": round(pk, 4),
                "time_ratio": round(ratio, 3),
                "meets": ok,
            }
        )
        t.add_row(
            v.name,
            f"{v.after_forward / MiB:.1f}",
            f"{100 * act:+.1f}%",
            f"{100 * recurrent:+.1f}%",
            f"{v.peak_above_params / MiB:.1f}",
            f"{100 * pk:+.1f}%",
            f"{ratio:.2f}",
            "==" if v.grads_equal else "[red]WRONG[/red]",
            "yes" if ok else "no",
            *(
                [f"{v.peak_above_start / MiB:.1f} / {v.allocator_peak / MiB:.1f}"]
                if v.allocator_peak is not None
                else []
            ),
        )
    Console(width=160).print(t)
    log(
        f"floor no time-step remat can remove: ~{floor / MiB:.1f} MiB = "
        f"{100 * floor / base.after_forward:.1f}% of the no-remat activation memory"
    )
    if plan_times:
        log(f"tightfit planning time per budget (s): {[round(x, 1) for x in plan_times]}")
    meta = meta_conditions() | {
        "desc": desc,
        "args": vars(args),
        "floor_bytes": floor,
        "headline": headline,
        "target_check": checks,
        "planning_s": plan_times,
    }
    results.say_written(write_results(args.results, rows, base, meta, title, device=args.device))


if __name__ == "__main__":
    main()
