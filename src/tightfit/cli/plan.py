"""``tightfit plan MODEL --budget X [--allow recompute,fewbit]``: plan a model's training step under a budget.

Without ``--allow`` it plans recomputation only (``tightfit.remat.Planner``); with ``--allow`` it plans
across the named techniques (``tightfit.plan``: recompute, offload, fewbit, sketch) and the table shows
each block's techniques, kept bytes, extra time and gradient SQNR. The plan shows the blocks checkpointed,
the option of each, predicted and measured peak and step time, and
the planning time; a rich progress bar runs while the blocks are measured. ``--plot FILE`` draws live
memory over one training step without remat and with the plan. ``--estimate`` plans under fake tensors
with FLOP-based times (``tightfit.remat.estimate_planner``).
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

from tightfit.cli._args import (
    CliError,
    add_model_arguments,
    add_optimizer_argument,
    factories_from_args,
    flag_value,
    optimizer_factory,
)

HELP = "plan recomputation of MODEL under a memory budget (--budget 2GiB)"


def configure(p: argparse.ArgumentParser) -> None:
    """MODEL and its batch options, --budget, --optimizer, planner switches, --estimate, --plot, --json."""
    add_model_arguments(p)
    p.add_argument(
        "--budget",
        required=True,
        metavar="SIZE",
        help="peak of live tensors for the whole training step (params, grads, optimizer state, "
        "activations), e.g. 2GiB, 512MB, 1.5e9; 'min' for the smallest feasible; 'x1.2' for the least "
        "memory predicted within 1.2 times the step time without remat",
    )
    add_optimizer_argument(p)
    p.add_argument(
        "--allow",
        metavar="LIST",
        help="plan across these techniques with tightfit.plan (comma-separated: recompute, offload, fewbit, "
        "sketch; fewbit and sketch change gradients within a measured SQNR floor); default: recompute only",
    )
    p.add_argument(
        "--min-grad-sqnr",
        type=float,
        default=None,
        metavar="DB",
        help="with --allow fewbit/sketch: the least gradient SQNR (dB) of a lossy block option",
    )
    p.add_argument(
        "--estimate",
        action="store_true",
        help="plan under FakeTensorMode with FLOP-based times (allocates nothing; approximate)",
    )
    p.add_argument(
        "--flop-rate", type=float, default=None, metavar="F", help="FLOP/s for --estimate (default 1e12)"
    )
    p.add_argument(
        "--no-segments",
        action="store_true",
        help="checkpoint blocks one by one only (no runs of blocks as one region; e.g. for torch.compile)",
    )
    p.add_argument(
        "--no-op-level",
        action="store_true",
        help="only the named in-block options, not the measured keep-these-ops ones (e.g. for torch.compile)",
    )
    p.add_argument(
        "--free-output",
        action="store_true",
        help="the training loop keeps only the loss, so the model output is freed before backward "
        "(default: it stays alive to the end of the step, as `tightfit profile` counts it)",
    )
    p.add_argument(
        "--compile",
        metavar="BACKEND",
        help="plan for torch.compile(model, backend=BACKEND) (e.g. inductor, aot_eager): whole steps are "
        "measured compiled and the budget holds for the compiled step",
    )
    p.add_argument("--plot", metavar="FILE", help="draw memory over the step, before/after (png, pdf, svg)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


class _Bar:
    """A rich progress bar fed by the planner's ``progress(what, done, total)`` callback."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # only when planning

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            transient=True,
        )
        self.task = None

    def __enter__(self) -> _Bar:
        self.progress.__enter__()
        self.task = self.progress.add_task("planning", total=1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, what: str, done: int, total: int) -> None:
        self.progress.update(self.task, description=what, completed=done, total=total)


def _budget(text: str) -> Any:
    """The ``Budget`` of ``--budget`` (``tightfit.remat.budget``: the forms every planner accepts)."""
    from tightfit.remat.budget import parse_budget  # only when the command runs

    return flag_value(parse_budget, text, "--budget")


def _run_planner(args: argparse.Namespace, budget: Any) -> int:
    """``--allow``: plan across techniques with ``tightfit.plan`` and print the plan."""
    from tightfit.errors import UserError
    from tightfit.planner import Planner
    from tightfit.planner.core import InvalidAllow
    from tightfit.remat import RematConfig

    for flag, given in (("--estimate", args.estimate), ("--compile", args.compile), ("--plot", args.plot)):
        if given:
            raise CliError(f"{flag} plans recomputation only: it cannot be combined with --allow")
    model_factory, batch_factory = factories_from_args(args)
    make_optimizer = optimizer_factory(args.optimizer)
    model = model_factory().train()
    batch = batch_factory()
    optimizer = make_optimizer(model.parameters()) if make_optimizer is not None else None
    config = RematConfig(
        op_level=not args.no_op_level, segments=not args.no_segments, keep_output=not args.free_output
    )
    extra = {} if args.min_grad_sqnr is None else {"min_grad_sqnr": args.min_grad_sqnr}
    with _Bar() as bar:
        try:
            planner = Planner(
                model, batch, allow=args.allow, optimizer=optimizer, config=config, progress=bar, **extra
            )
            bar("solving and verifying", 1, 1)
            plan = planner.plan(budget)
        except InvalidAllow as e:
            raise CliError(f"--allow: {e}") from None
        except UserError as e:  # an infeasible budget, a plan applied already, a step not reproducible, ...
            raise CliError(str(e)) from None
    print(plan.to_json(indent=1) if args.json else plan)
    return 0


def run(args: argparse.Namespace) -> int:
    """Plan and print the plan (a table, or JSON with --json); exit status 0. User mistakes raise
    `CliError`."""
    # the planner imports torch and measures models: only when the command runs, not for --help
    from tightfit.remat import InfeasibleBudget, Planner, RematConfig, estimate_planner

    budget = _budget(args.budget)
    if args.allow is not None:
        return _run_planner(args, budget)
    if args.min_grad_sqnr is not None:
        raise CliError("--min-grad-sqnr needs --allow with fewbit or sketch")
    model_factory, batch_factory = factories_from_args(args)
    make_optimizer = optimizer_factory(args.optimizer)
    if args.estimate and args.plot:
        raise CliError("--plot needs a real run: it cannot be combined with --estimate")
    if args.estimate and args.compile:
        raise CliError("--compile measures compiled steps: it cannot be combined with --estimate")
    if args.flop_rate is not None and (not args.estimate or args.flop_rate <= 0):
        raise CliError("--flop-rate needs --estimate and a positive number of FLOP/s")
    with _Bar() as bar:
        if args.estimate:
            config = RematConfig(
                flop_rate=args.flop_rate,  # None: estimate_planner's nominal rate
                segments=not args.no_segments,
                keep_output=not args.free_output,
            )
            planner, mode = estimate_planner(
                model_factory, batch_factory, optimizer_factory=make_optimizer, config=config, progress=bar
            )
        else:
            model = model_factory().train()
            batch = batch_factory()
            optimizer = make_optimizer(model.parameters()) if make_optimizer is not None else None
            config = RematConfig(
                op_level=not args.no_op_level,
                segments=not args.no_segments,
                keep_output=not args.free_output,
                compile_backend=args.compile,
            )
            planner = Planner(model, batch, optimizer=optimizer, config=config, progress=bar)
            mode = contextlib.nullcontext()
        bar("solving and verifying", 1, 1)
        try:
            with mode:
                plan = planner.plan(planner.resolve_budget(budget))
        except InfeasibleBudget as e:
            raise CliError(str(e)) from None
    if args.estimate:
        rate = planner.config.flop_rate
        plan.notes.append(
            f"--estimate: memory measured under fake tensors (exact for this device type's kernels), "
            f"times from FLOPs at {rate:.3g} FLOP/s + bytes written at {rate / 50:.3g} B/s: approximate"
        )
    print(plan.to_json(indent=1) if args.json else plan)
    if args.plot:
        from tightfit.remat.plot import plot_memory  # matplotlib: only when a plot is asked for

        plot_memory(planner, plan, args.plot, title=f"{args.model}: one training step")
        print(f"memory plot written to {args.plot}")
    return 0
