"""The ``tightfit`` command line: ``profile`` a training step, ``plan`` recomputation, ``demo``, ``models``.

Each subcommand is a `Command` in `COMMANDS` (name, help, configure(parser), run(args) -> exit code);
adding one is a function pair and one line there. Commands that take a model share `add_model_arguments`
and `factories_from_args` (MODEL is a zoo name or ``path/to/file.py:factory``), and budgets go through
`parse_budget`. User mistakes (unknown model, bad file, bad size, bad option) print one line ``tightfit:
error: ...`` and exit with status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from tightfit.errors import LossError, UserError

USER_ERROR = 2


class CliError(Exception):
    """A mistake in what the user asked for: reported as one line, exit status 2, no traceback."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the user asked for something invalid" (ours only: no bare ValueError)."""
    from tightfit.errors import UserError
    from tightfit.zoo import ZooError

    return (CliError, ZooError, UserError)


# ------------------------------------------------------------------------------- shared argument helpers
DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "sgd", "none")


def add_model_arguments(parser: argparse.ArgumentParser, *, model_default: str | None = None) -> None:
    """MODEL and the options that shape its sample batch: --batch, --seq | --image, --dtype, --device."""
    if model_default is None:
        parser.add_argument(
            "model", metavar="MODEL", help="a zoo name (list: `tightfit models`) or file.py:factory"
        )
    else:
        parser.add_argument(
            "--model", default=model_default, help=f"zoo name or file.py:factory (default {model_default})"
        )
    parser.add_argument("--batch", type=int, metavar="B", help="batch size (default: the model's)")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--seq", type=int, metavar="T", help="sequence length, for token models")
    shape.add_argument("--image", type=int, metavar="N", help="image side in pixels, for image models")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter/activation dtype")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def factories_from_args(args: argparse.Namespace) -> tuple[Callable[[], torch.nn.Module], Callable[[], Any]]:
    """Zero-argument (model_factory, batch_factory) for the MODEL and batch options in `args`."""
    from tightfit import zoo

    for flag, value in (("--batch", args.batch), ("--seq", args.seq), ("--image", args.image)):
        if value is not None and value < 1:
            raise CliError(f"{flag} must be a positive integer, got {value}")
    device = _device(args.device)
    model_factory, batch_factory = zoo.get(args.model)
    batch_kwargs = {"batch_size": args.batch, "seq_len": args.seq, "image_size": args.image}
    batch_kwargs = {k: v for k, v in batch_kwargs.items() if v is not None}
    return (
        partial(model_factory, dtype=args.dtype, device=device),
        partial(batch_factory, dtype=args.dtype, device=device, **batch_kwargs),
    )


def _device(text: str) -> str:
    try:
        kind = torch.device(text).type
    except RuntimeError as e:
        raise CliError(f"invalid --device {text!r}: {e}") from None
    backend = getattr(torch, kind, None)
    if kind not in ("cpu", "meta") and backend is not None and hasattr(backend, "is_available"):
        if not backend.is_available():
            raise CliError(
                f"--device {text}: no {kind} device is available to this PyTorch; try --device cpu"
            )
    return text


def parse_budget(text: str, flag: str = "--budget") -> int:
    """A size such as 2GiB, 512MB or 1.5e9 in bytes; a `CliError` naming the accepted forms otherwise."""
    from tightfit.sizes import parse_size

    try:
        return parse_size(text)
    except (ValueError, TypeError) as e:
        raise CliError(f"{flag}: {e}") from None


def optimizer_factory(name: str, lr: float = 1e-3) -> Callable[[Any], torch.optim.Optimizer] | None:
    """``params -> optimizer`` for --optimizer (AdamW keeps 2 states per parameter; plain SGD none)."""
    if name == "none":
        return None
    if name == "adamw":
        return partial(torch.optim.AdamW, lr=lr)
    if name == "sgd":
        return partial(torch.optim.SGD, lr=lr)
    raise CliError(f"unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")


def measure(args: argparse.Namespace, estimate: bool) -> Any:
    """The MemoryReport of one training step of the model in `args` (profiled, or estimated under fake
    tensors), labelled with the name the user gave."""
    import tightfit

    model_factory, batch_factory = factories_from_args(args)
    make_optimizer = optimizer_factory(args.optimizer)
    if not estimate:
        check_fits_in_ram(args, model_factory)
    try:
        if estimate:
            report = tightfit.estimate(model_factory, batch_factory, optimizer_factory=make_optimizer)
        else:
            model = model_factory()
            batch = batch_factory()
            optimizer = make_optimizer(model.parameters()) if make_optimizer is not None else None
            report = tightfit.profile(model, batch, optimizer=optimizer)
    except LossError as e:
        hint = " (here: make the model return a scalar loss, or an output with .loss)"
        raise CliError(f"{args.model}: {e}{hint}") from e
    except UserError as e:
        raise CliError(f"{args.model}: {e}") from e
    report.model = args.model
    return report


def available_ram() -> int | None:
    """Bytes of RAM available now (Linux/Unix sysconf), or None where unknown."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_ram(args: argparse.Namespace, model_factory: Callable[..., torch.nn.Module]) -> None:
    """Refuse to profile on the CPU a zoo model whose parameters, gradients and optimizer state alone exceed
    the available RAM (a lower bound: activations come on top), instead of swapping the machine to death.
    The count comes from building the model on the meta device, which allocates nothing."""
    from tightfit.sizes import format_size
    from tightfit.zoo import is_file_spec

    if torch.device(args.device).type != "cpu" or is_file_spec(args.model):
        return
    available = available_ram()
    if available is None:
        return
    with torch.device("meta"):
        params = model_factory(device=None).parameters()
        param_bytes = sum(p.numel() * p.element_size() for p in params)
    copies = 2 + {"adamw": 2, "sgd": 0, "none": 0}.get(args.optimizer, 0)  # params, grads, optimizer state
    need = copies * param_bytes
    if need > available:
        raise CliError(
            f"{args.model}: its parameters, gradients and optimizer state alone need {format_size(need)}, "
            f"more than the {format_size(available)} of RAM available; add --estimate to measure it "
            "without allocating"
        )


# Functions of the step convention and the ruler that raise TypeError/ValueError only about what the user
# passed (no loss in the output, nothing to train). Matched on the raising frame, so errors from deeper
# down (bugs) keep their traceback.
# ------------------------------------------------------------------------------------------ commands
@dataclass(frozen=True)
class Command:
    """One subcommand: its name and help line, how it adds its arguments, and what it runs."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _configure_profile(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument(
        "--optimizer", choices=OPTIMIZERS, default="adamw", help="optimizer of the step (default adamw)"
    )
    p.add_argument(
        "--estimate",
        action="store_true",
        help="estimate under FakeTensorMode: allocates nothing, for models larger than this machine",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _run_profile(args: argparse.Namespace) -> int:
    report = measure(args, estimate=args.estimate)
    print(report.to_json() if args.json else report)
    return 0


def _configure_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="include the -tiny test variants")


def _run_list(args: argparse.Namespace) -> int:
    from tightfit import zoo

    for name in zoo.names(include_tiny=args.all):
        print(f"{name:20s} {zoo.spec(name).description}")
    print("\nor a model of your own: path/to/file.py:factory (returning a module, or (module, batch))")
    return 0


# ----------------------------------------------------------------------------------------------- demo
@dataclass(frozen=True)
class DemoSection:
    """One part of `tightfit demo`: a title and a function that prints it (later issues append sections,
    e.g. before/after comparisons of the memory-saving techniques)."""

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


def explain(report: Any, tokens: int | None = None, top: int = 4) -> list[str]:
    """Plain-language lines on the largest memory consumers of a `MemoryReport`."""
    from tightfit.sizes import format_size as fs

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
    batch = batch_factory()
    values = (
        batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    )
    for v in values:
        if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dim() >= 2:
            return int(v.shape[0] * v.shape[1])
    return None


def _demo_profile(args: argparse.Namespace) -> None:
    ns = argparse.Namespace(**{**vars(args), "optimizer": "adamw"})
    report = measure(ns, estimate=False)
    print(report)
    print()
    _, batch_factory = factories_from_args(ns)
    for line in explain(report, tokens=_tokens(batch_factory)):
        print(textwrap.fill(line, width=100, initial_indent="- ", subsequent_indent="  "))


def _demo_estimate(args: argparse.Namespace) -> None:
    from tightfit.sizes import format_size

    ns = argparse.Namespace(
        **{**vars(args), "model": args.large, "batch": args.large_batch, "seq": None, "image": None},
        optimizer="adamw",
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
    from rich.console import Console
    from rich.table import Table

    import tightfit
    from tightfit.sizes import format_size

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

    def remat(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        activations_free = baseline.peak_bytes - baseline.activations_bytes
        budget = int(activations_free + 0.5 * baseline.activations_bytes)
        options = ("store", "recompute")  # the two cheapest to measure: keeps the demo quick
        try:
            return tightfit.rematerialize(model, batch, budget, optimizer=optimizer, options=options)
        except tightfit.remat.InfeasibleBudget as err:
            return tightfit.rematerialize(model, batch, err.min_budget, optimizer=optimizer, options=options)

    rows = [("PyTorch", baseline)]
    rows += [
        (name, run(fn))
        for name, fn in (
            ("FewBit(bits=2)", fewbit),
            ("Sketch(ratio=0.5)", sketch),
            ("rematerialize", remat),
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
    print(
        textwrap.fill(
            "Peaks are exact (live tensors, tightfit.memory); step times are medians of 2 steps on this "
            "machine and noisy. rematerialize was given half the activations as budget. Few-bit and "
            "randomized layers change the gradients slightly (see the README's convergence tables); "
            "rematerialization reproduces them bit for bit.",
            width=100,
            initial_indent="- ",
            subsequent_indent="  ",
        )
    )


DEMO_SECTIONS: list[DemoSection] = [
    DemoSection("profile", "Where the memory of one training step goes (measured exactly)", _demo_profile),
    DemoSection("estimate", "A model larger than this machine, estimated without allocating", _demo_estimate),
    DemoSection("shrink", "The same step with each of tightfit's techniques, side by side", _demo_shrink),
]


def _configure_demo(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, model_default="gpt2-small-cpu")
    p.set_defaults(batch=4, seq=128)
    p.add_argument("--large", default="gpt2-xl", help="model for the estimate section (default gpt2-xl)")
    p.add_argument("--large-batch", type=int, default=1, metavar="B", help="its batch size (default 1)")
    p.add_argument(
        "--only",
        action="append",
        choices=[s.name for s in DEMO_SECTIONS],
        help="run only this section (repeatable)",
    )


def _run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    if args.image is not None:  # the --seq default does not apply to an image model
        args.seq = None
    sections = [s for s in DEMO_SECTIONS if not args.only or s.name in args.only]
    for i, section in enumerate(sections, 1):
        console.rule(f"[bold]{i}. {section.title}")
        section.run(args)
        print()
    return 0


def _configure_plan(p: argparse.ArgumentParser) -> None:
    from tightfit.remat.cli import configure_plan

    configure_plan(p)


def _run_plan(args: argparse.Namespace) -> int:
    from tightfit.remat.cli import run_plan

    return run_plan(args)


COMMANDS: list[Command] = [
    Command(
        "profile",
        "measure (or --estimate) the memory of one training step of MODEL",
        _configure_profile,
        _run_profile,
    ),
    Command(
        "plan",
        "plan recomputation of MODEL under a memory budget (--budget 2GiB)",
        _configure_plan,
        _run_plan,
    ),
    Command("demo", "profile a real model and show where its memory goes", _configure_demo, _run_demo),
    Command("models", "list the built-in models", _configure_list, _run_list),
]


# ------------------------------------------------------------------------------------------ entry point
class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors print one line (no usage dump) and exit with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from tightfit import __version__

    parser = _Parser(prog="tightfit", description="Memory-efficient training: measure, then shrink.")
    parser.add_argument("--version", action="version", version=f"tightfit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.configure(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (status 2), --help and --version (0): return, don't exit
        return e.code if isinstance(e.code, int) else USER_ERROR
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return USER_ERROR
    try:
        return int(args._run(args))
    except _user_errors() as e:
        print("tightfit: error: " + " ".join(str(e).split()), file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("tightfit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
