"""What the commands share: MODEL and its batch options, the one ``--optimizer``, budgets, and `CliError`.

MODEL is a zoo name or ``path/to/file.py:factory``; every command that takes one declares it with
`add_model_arguments` and turns it into factories with `factories_from_args`. Every command that runs a
training step declares ``--optimizer`` with `add_optimizer_argument`, so it has one default everywhere.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from tightfit.errors import UserError
from tightfit.sizes import parse_size

if TYPE_CHECKING:  # annotations only: torch takes a second to import and --help does not need it
    import torch

USER_ERROR = 2  # exit status of a user mistake (argparse's own usage errors use it too)
DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "sgd", "none")
# A budget or a profile covers a whole training step, optimizer state included, and AdamW (two states per
# parameter) is what most models train with: measuring without an optimizer would undercount it.
DEFAULT_OPTIMIZER = "adamw"
_T = TypeVar("_T")


class CliError(Exception):
    """A mistake in what the user asked for: reported as one line, exit status 2, no traceback."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the user asked for something invalid" (ours only: no bare ValueError)."""
    # the zoo imports torch: only needed once a command has failed
    from tightfit.zoo import ZooError

    return (CliError, ZooError, UserError)


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


def add_optimizer_argument(parser: argparse.ArgumentParser) -> None:
    """``--optimizer``, declared here only, so every command measures the same step by default."""
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=DEFAULT_OPTIMIZER,
        help=f"optimizer of the training step (default {DEFAULT_OPTIMIZER}: a profile or a budget covers "
        "the whole step, optimizer state included; AdamW keeps two states per parameter, plain SGD none)",
    )


def factories_from_args(
    args: argparse.Namespace, device: str | None = None
) -> tuple[Callable[..., torch.nn.Module], Callable[..., Any]]:
    """(model_factory, batch_factory) for the MODEL and batch options in `args`: call them with no arguments
    for the model and batch the user asked for. ``device`` overrides ``--device`` (an estimate for a GPU
    this machine lacks builds on the CPU)."""
    # the zoo imports torch (and transformers for its models): only when a command runs
    from tightfit import zoo

    for flag, value in (("--batch", args.batch), ("--seq", args.seq), ("--image", args.image)):
        if value is not None and value < 1:
            raise CliError(f"{flag} must be a positive integer, got {value}")
    device = device if device is not None else _device(args.device)
    model_factory, batch_factory = zoo.get(args.model)
    batch_kwargs = {"batch_size": args.batch, "seq_len": args.seq, "image_size": args.image}
    batch_kwargs = {k: v for k, v in batch_kwargs.items() if v is not None}
    return (
        partial(model_factory, dtype=args.dtype, device=device),
        partial(batch_factory, dtype=args.dtype, device=device, **batch_kwargs),
    )


def _device(text: str) -> str:
    """`text` when it names a device this PyTorch can use; a `CliError` saying what is missing otherwise."""
    import torch  # heavy: only when a command runs, not for --help

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


def flag_value(parse: Callable[[str], _T], text: str, flag: str) -> _T:
    """``parse(text)``; a `CliError` naming ``flag`` and what ``parse`` said when it raises ValueError or
    TypeError."""
    try:
        return parse(text)
    except (ValueError, TypeError) as e:
        raise CliError(f"{flag}: {e}") from None


def parse_budget(text: str, flag: str = "--budget") -> int:
    """A size such as 2GiB, 512MB or 1.5e9 in bytes; a `CliError` naming the accepted forms otherwise."""
    return flag_value(parse_size, text, flag)


def optimizer_factory(name: str, lr: float = 1e-3) -> Callable[[Any], torch.optim.Optimizer] | None:
    """``params -> optimizer`` for --optimizer (AdamW keeps 2 states per parameter; plain SGD none)."""
    if name == "none":
        return None
    import torch  # heavy: only when a command runs, not for --help

    if name == "adamw":
        return partial(torch.optim.AdamW, lr=lr)
    if name == "sgd":
        return partial(torch.optim.SGD, lr=lr)
    raise CliError(f"unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
