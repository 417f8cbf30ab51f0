"""``tightfit plan MODEL --budget X``: plan rematerialization for a model and print the plan.

The plan shows the blocks checkpointed, the option of each, predicted and measured peak and step time, and
the planning time; a rich progress bar runs while the blocks are measured. ``--plot FILE`` draws live
memory over one training step without remat and with the plan. ``--estimate`` plans under fake tensors
with FLOP-based times (``tightfit.remat.estimate_planner``).
"""

from __future__ import annotations

import argparse
import contextlib

from tightfit.cli._args import (
    CliError,
    add_model_arguments,
    add_optimizer_argument,
    factories_from_args,
    optimizer_factory,
    parse_budget,
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


def _overhead_ratio(budget: str) -> float | None:
    """The step-time ratio of a ``--budget xR``, None for a size or 'min'."""
    if not budget.lower().startswith("x"):
        return None
    try:
        ratio = float(budget[1:])
    except ValueError:
        ratio = float("nan")
    if not ratio >= 1.0:
        raise CliError(f"--budget {budget!r}: a step-time ratio is 'x' and a number >= 1, e.g. x1.2")
    return ratio


def run(args: argparse.Namespace) -> int:
    """Plan and print the plan (a table, or JSON with --json); exit status 0. User mistakes raise
    `CliError`."""
    # the planner imports torch and measures models: only when the command runs, not for --help
    from tightfit.remat import InfeasibleBudget, Planner, RematConfig, estimate_planner

    model_factory, batch_factory = factories_from_args(args)
    make_optimizer = optimizer_factory(args.optimizer)
    ratio = _overhead_ratio(args.budget)
    budget = None if args.budget == "min" or ratio is not None else parse_budget(args.budget)
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
                if ratio is not None:
                    budget = planner.budget_for_overhead(ratio)
                plan = planner.plan(planner.min_budget if budget is None else budget)
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
