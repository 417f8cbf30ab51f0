"""``tightfit profile MODEL``: measure (or ``--estimate``) the memory of one training step and print it.

`measure` is also what ``tightfit demo`` reports on. A real measurement on the CPU first checks that the
model's parameters, gradients and optimizer state fit in the RAM available, so a model too large for the
machine is refused with a pointer to ``--estimate`` instead of swapping the machine to death.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from tightfit.cli._args import (
    CliError,
    add_model_arguments,
    add_optimizer_argument,
    factories_from_args,
    optimizer_factory,
)
from tightfit.errors import LossError, UserError
from tightfit.sizes import format_size

if TYPE_CHECKING:  # annotations only: torch and the ruler take a second to import, --help needs neither
    import torch

    from tightfit.memory import MemoryReport

HELP = "measure (or --estimate) the memory of one training step of MODEL"


def configure(p: argparse.ArgumentParser) -> None:
    """MODEL and its batch options, --optimizer, --estimate, --json."""
    add_model_arguments(p)
    add_optimizer_argument(p)
    p.add_argument(
        "--estimate",
        action="store_true",
        help="estimate under FakeTensorMode: allocates nothing, for models larger than this machine",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Print the report (a table, or JSON with --json); exit status 0."""
    report = measure(args, estimate=args.estimate)
    print(report.to_json() if args.json else report)
    return 0


def measure(args: argparse.Namespace, estimate: bool) -> MemoryReport:
    """The MemoryReport of one training step of the model in `args` (profiled, or estimated under fake
    tensors), labelled with the name the user gave."""
    import tightfit  # the ruler imports torch: only when a command runs, not for --help

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
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_ram(args: argparse.Namespace, model_factory: Callable[..., torch.nn.Module]) -> None:
    """Refuse to profile on the CPU a zoo model whose parameters, gradients and optimizer state alone exceed
    the available RAM (a lower bound: activations come on top), instead of swapping the machine to death.
    The count comes from building the model on the meta device, which allocates nothing."""
    import torch  # heavy: only when a command runs, not for --help

    from tightfit.zoo import is_file_spec  # the zoo imports torch, as above

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
