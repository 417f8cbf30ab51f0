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
        help="estimate under FakeTensorMode: allocates nothing, for models larger than this machine "
        "(with --device cuda also on a machine without a GPU)",
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=1,
        metavar="N",
        help="with --estimate: one rank's step of N data-parallel ranks (needs --parallel; the batch "
        "options give one rank's batch)",
    )
    p.add_argument(
        "--parallel",
        choices=("fsdp2", "ddp"),
        help="with --estimate: how the model is spread over the ranks (FSDP2: fully_shard per block, then "
        "the root; DDP: replicated, with gradient buckets)",
    )
    p.add_argument(
        "--autocast",
        choices=("bfloat16", "float16"),
        help="with --estimate: run the forward under autocast to this dtype on --device, as a training "
        "loop with torch.autocast does",
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

    world_size = getattr(args, "world_size", 1)
    parallel = getattr(args, "parallel", None)
    autocast = getattr(args, "autocast", None)
    if not estimate and (world_size != 1 or parallel is not None or autocast is not None):
        raise CliError(
            "--world-size, --parallel and --autocast describe an estimate: add --estimate (to measure "
            "real ranks, call tightfit.profile in the script torchrun runs)"
        )
    if world_size < 1:
        raise CliError(f"--world-size must be a positive integer, got {world_size}")
    if world_size > 1 and parallel is None:
        raise CliError(f"--world-size {world_size} needs --parallel fsdp2 or --parallel ddp")
    device = None
    if estimate and _is_absent_cuda(args.device):
        device = "cpu"  # fake tensors that take the GPU's paths (tightfit.memory.fakecuda)
    model_factory, batch_factory = factories_from_args(args, device=device)
    make_optimizer = optimizer_factory(args.optimizer)
    if not estimate:
        check_fits_in_ram(args, model_factory)
    try:
        if estimate:
            import torch

            report = tightfit.estimate(
                model_factory,
                batch_factory,
                optimizer_factory=make_optimizer,
                world_size=world_size,
                parallel=parallel,
                device=args.device if device is not None else None,
                autocast=getattr(torch, autocast) if autocast is not None else None,
            )
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


def _is_absent_cuda(text: str) -> bool:
    """Whether `text` names a CUDA device and this PyTorch has none (an estimate can still be made)."""
    import torch  # heavy: only when a command runs, not for --help

    try:
        return torch.device(text).type == "cuda" and not torch.cuda.is_available()
    except RuntimeError:
        return False


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
