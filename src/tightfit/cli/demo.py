"""``tightfit demo``: profile a real model, explain where its memory goes, and shrink it side by side.

The demo is a list of `DemoSection`s (a title and a function that prints the section); ``--only`` picks
some. `explain` turns a `MemoryReport` into plain-language lines on its largest memory consumers.
"""

from __future__ import annotations

import argparse
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tightfit.cli._args import DEFAULT_OPTIMIZER, add_model_arguments, factories_from_args
from tightfit.cli.profile import measure
from tightfit.sizes import format_size

if TYPE_CHECKING:  # annotations only: the ruler imports torch, which --help does not need
    from tightfit.memory import MemoryReport

HELP = "profile a real model and show where its memory goes"


@dataclass(frozen=True)
class DemoSection:
    """One part of `tightfit demo`: a name for ``--only``, a title, and a function that prints it."""

    name: str
    title: str
    run: Callable[[argparse.Namespace], None]


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def _by_layer_pattern(per_module: dict[str, int]) -> list[tuple[str, int, int]]:
    """Saved bytes grouped by module path with block indices folded (h.0.mlp.act, h.1.mlp.act -> h.*.mlp.act):
    (pattern, bytes, number of modules), largest first."""
    groups: dict[str, list[int]] = {}
    for path, nbytes in per_module.items():
        key = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", path) or "<model's own ops>"
        groups.setdefault(key, []).append(nbytes)
    parents = {k for k in groups for other in groups if other.startswith(k + ".")}
    rows = [(f"{k} (own ops)" if k in parents else k, sum(v), len(v)) for k, v in groups.items()]
    return sorted(rows, key=lambda r: -r[1])


def explain(report: MemoryReport, tokens: int | None = None, top: int = 4) -> list[str]:
    """Plain-language lines on the largest memory consumers of a `MemoryReport`."""
    fs = format_size
    peak = report.peak_bytes
    fixed = report.params_bytes + report.grads_bytes + report.optimizer_bytes
    act = report.activations_bytes
    where = f"during the {report.peak_phase}" + (f", in op {report.peak_op}" if report.peak_op else "")
    lines = [f"The step peaks at {fs(peak)} of live tensors {where}."]
    lines.append(
        f"Weights, their gradients and the optimizer state take {fs(fixed)} "
        f"({_pct(fixed, peak)} of the peak): "
        f"parameters {fs(report.params_bytes)}, gradients {fs(report.grads_bytes)}, "
        f"optimizer state {fs(report.optimizer_bytes)}. This part does not depend on the batch."
    )
    per_token = f"; that is {fs(act / tokens)} per token of the batch" if tokens else ""
    ratio = act / report.params_bytes if report.params_bytes else float("nan")
    lines.append(
        f"Activations saved for the backward pass take {fs(act)} ({_pct(act, peak)} of the peak, "
        f"{ratio:.1f}x the parameters){per_token}. They grow with batch size x sequence length."
    )
    groups = [g for g in _by_layer_pattern(report.per_module) if not g[0].startswith("<outside>")][:top]
    if groups and act:
        parts = [
            f"{name} {fs(nbytes)} ({_pct(nbytes, act)}" + (f", over {n} blocks)" if n > 1 else ")")
            for name, nbytes, n in groups
        ]
        lines.append("The largest savers of activations: " + "; ".join(parts) + ".")
    lines.append(
        "Activations are what tightfit shrinks: recompute them in the backward (tightfit.rematerialize), "
        "keep activation derivatives in a few bits (tightfit.FewBit), or keep a random sketch of "
        "linear layers' inputs (tightfit.Sketch)."
    )
    return lines


def _tokens(batch_factory: Callable[[], Any]) -> int | None:
    """Tokens (or images) in the batch: the first dimension times the second of the first integer tensor."""
    import torch  # heavy: only when a command runs, not for --help

    batch = batch_factory()
    values = (
        batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    )
    for v in values:
        if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dim() >= 2:
            return int(v.shape[0] * v.shape[1])
    return None


def _demo_profile(args: argparse.Namespace) -> None:
    ns = argparse.Namespace(**{**vars(args), "optimizer": DEFAULT_OPTIMIZER})
    report = measure(ns, estimate=False)
    print(report)
    print()
    _, batch_factory = factories_from_args(ns)
    for line in explain(report, tokens=_tokens(batch_factory)):
        print(textwrap.fill(line, width=100, initial_indent="- ", subsequent_indent="  "))


def _demo_estimate(args: argparse.Namespace) -> None:
    ns = argparse.Namespace(
        **{**vars(args), "model": args.large, "batch": args.large_batch, "seq": None, "image": None},
        optimizer=DEFAULT_OPTIMIZER,
    )
    report = measure(ns, estimate=True)
    print(report)
    print()
    line = (
        f"Nothing was allocated: {args.large} was built and run under FakeTensorMode, which tracks shapes "
        f"only. A training step would need {format_size(report.peak_bytes)}; "
        f"the FLOP count is {report.flops:.3e} per step."
    )
    print(textwrap.fill(line, width=100, initial_indent="- ", subsequent_indent="  "))


def _demo_shrink(args: argparse.Namespace) -> None:
    """The same step before and after each technique, measured side by side in this process."""
    # torch and the techniques take seconds to import: only when the section runs, not for --help
    import torch
    from rich.console import Console
    from rich.table import Table

    import tightfit

    model_factory, batch_factory = factories_from_args(args)
    batch = batch_factory()

    def run(prepare: Callable[[torch.nn.Module, torch.optim.Optimizer], torch.nn.Module]) -> Any:
        model = model_factory()  # same seed: same weights for every variant
        optimizer = torch.optim.AdamW(model.parameters())
        model = prepare(model, optimizer)
        return tightfit.profile(model, batch, optimizer=optimizer, time_steps=2)

    def fewbit(model: torch.nn.Module, _: Any) -> torch.nn.Module:
        tightfit.convert_(model, tightfit.FewBit(bits=2), verbose=False)
        return model

    def sketch(model: torch.nn.Module, _: Any) -> torch.nn.Module:
        tightfit.convert_(model, tightfit.Sketch(ratio=0.5), verbose=False, example=batch)
        return model

    baseline = run(lambda model, _: model)
    # rematerialize and tightfit.plan get half the activations as budget (the smallest feasible one when
    # that is too small), measuring the two cheapest options only: keeps the demo quick
    activations_free = baseline.peak_bytes - baseline.activations_bytes
    budget = int(activations_free + 0.5 * baseline.activations_bytes)
    config = tightfit.remat.RematConfig(options=("store", "recompute"))

    def remat(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        try:
            return tightfit.rematerialize(model, batch, budget, optimizer=optimizer, config=config)
        except tightfit.remat.InfeasibleBudget as err:
            return tightfit.rematerialize(model, batch, err.min_budget, optimizer=optimizer, config=config)

    Prepare = Callable[[torch.nn.Module, torch.optim.Optimizer], torch.nn.Module]

    def one_knob(allow: tuple[str, ...]) -> Prepare:
        def prepare(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
            planner = tightfit.planner.Planner(model, batch, allow=allow, optimizer=optimizer, config=config)
            return planner.plan(max(budget, planner.min_budget)).apply_(model)

        return prepare

    rows = [("PyTorch", baseline)]
    rows += [
        (name, run(fn))
        for name, fn in (
            ("FewBit(bits=2)", fewbit),
            ("Sketch(ratio=0.5)", sketch),
            ("rematerialize", remat),
            ("tightfit.plan (lossless)", one_knob(("recompute", "offload"))),
            ("tightfit.plan (+fewbit)", one_knob(("recompute", "offload", "fewbit"))),
        )
    ]
    table = Table(title=f"{args.model}, batch {args.batch}, AdamW: one training step", header_style="bold")
    table.add_column("variant", no_wrap=True)
    for column in ("peak", "vs PyTorch", "activations", "step time ratio"):
        table.add_column(column, justify="right")
    for name, report in rows:
        ratio = report.step_time / baseline.step_time if report.step_time and baseline.step_time else None
        table.add_row(
            name,
            format_size(report.peak_bytes),
            f"{report.peak_bytes / baseline.peak_bytes:.2f}x",
            format_size(report.activations_bytes),
            f"{ratio:.2f}x" if ratio is not None else "-",
        )
    Console().print(table)
    if args.pareto:
        points = [
            (name, report.peak_bytes, report.step_time / baseline.step_time)
            for name, report in rows
            if report.step_time and baseline.step_time
        ]
        pareto_plot(points, args.pareto, title=f"{args.model}: peak vs step time, one training step")
        print(f"Pareto plot written to {args.pareto}")
    print(
        textwrap.fill(
            "Peaks are exact (live tensors, tightfit.memory); step times are medians of 2 steps on this "
            "machine and noisy. rematerialize and tightfit.plan were given half the activations as "
            "budget (tightfit.plan: one knob across the allowed techniques). Few-bit and "
            "randomized layers change the gradients slightly (see docs/benchmarks/sketch.md); "
            "rematerialization and the lossless plan reproduce them bit for bit.",
            width=100,
            initial_indent="- ",
            subsequent_indent="  ",
        )
    )


def pareto_front(points: list[tuple[str, int, float]]) -> list[tuple[str, int, float]]:
    """The (name, peak, time) points no other point beats on both peak and time, by peak."""
    ordered = sorted(points, key=lambda p: (p[1], p[2]))
    front: list[tuple[str, int, float]] = []
    for point in ordered:
        if not front or point[2] < front[-1][2]:
            front.append(point)
    return front


def pareto_plot(points: list[tuple[str, int, float]], path: str, title: str = "") -> None:
    """Peak (MiB) against step-time ratio of each (name, peak bytes, ratio) point, the Pareto front drawn
    as a line, into the image ``path`` (matplotlib, imported here only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, peak, ratio in points:
        ax.scatter(peak / 2**20, ratio)
        ax.annotate(name, (peak / 2**20, ratio), fontsize=8, xytext=(4, 4), textcoords="offset points")
    front = pareto_front(points)
    ax.plot([p[1] / 2**20 for p in front], [p[2] for p in front], "--", color="gray", label="Pareto front")
    ax.set_xlabel("peak of one training step (MiB, measured)")
    ax.set_ylabel("step time / PyTorch's")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


DEMO_SECTIONS: list[DemoSection] = [
    DemoSection("profile", "Where the memory of one training step goes (measured exactly)", _demo_profile),
    DemoSection("estimate", "A model larger than this machine, estimated without allocating", _demo_estimate),
    DemoSection("shrink", "The same step with each of tightfit's techniques, side by side", _demo_shrink),
]


def configure(p: argparse.ArgumentParser) -> None:
    """--model (a small GPT-2 by default) and its batch, --large for the estimate section, --only."""
    add_model_arguments(p, model_default="gpt2-small-cpu")
    p.set_defaults(batch=4, seq=128)
    p.add_argument("--large", default="gpt2-xl", help="model for the estimate section (default gpt2-xl)")
    p.add_argument("--large-batch", type=int, default=1, metavar="B", help="its batch size (default 1)")
    p.add_argument(
        "--pareto", metavar="FILE", help="draw peak against step time of every variant into FILE (png, svg)"
    )
    p.add_argument(
        "--only",
        action="append",
        choices=[s.name for s in DEMO_SECTIONS],
        help="run only this section (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    """Print the chosen sections, each under a rule; exit status 0."""
    from rich.console import Console  # rich: only for commands that draw, not for --help

    console = Console()
    if args.image is not None:  # the --seq default does not apply to an image model
        args.seq = None
    sections = [s for s in DEMO_SECTIONS if not args.only or s.name in args.only]
    for i, section in enumerate(sections, 1):
        console.rule(f"[bold]{i}. {section.title}")
        section.run(args)
        print()
    return 0
