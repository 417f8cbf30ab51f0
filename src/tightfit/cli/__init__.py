"""The ``tightfit`` command line: ``profile`` a training step, ``plan`` recomputation, ``demo``, ``models``.

Each subcommand is a module here with ``HELP``, ``configure(parser)`` and ``run(args) -> exit code``, and
one `Command` line in `COMMANDS`. What commands share (MODEL and its batch options, ``--optimizer``, budget
parsing, `CliError`) is in `tightfit.cli._args`. The CLI calls only tightfit's public API.

User mistakes (unknown model, bad file, bad size, bad option) print one line ``tightfit: error: ...`` and
exit with status 2; anything else is a bug and shows its traceback. Building the parser imports neither
torch nor the library, so ``tightfit --help`` is instant: each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tightfit._version import __version__
from tightfit.cli import demo, models, plan, profile
from tightfit.cli._args import USER_ERROR, CliError, user_errors


@dataclass(frozen=True)
class Command:
    """One subcommand: its name and help line, how it adds its arguments, and what it runs."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = [
    Command("profile", profile.HELP, profile.configure, profile.run),
    Command("plan", plan.HELP, plan.configure, plan.run),
    Command("demo", demo.HELP, demo.configure, demo.run),
    Command("models", models.HELP, models.configure, models.run),
]


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors print one line (no usage dump) and exit with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; a parsed command's ``args._run(args)`` runs it."""
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
    except user_errors() as e:
        print("tightfit: error: " + " ".join(str(e).split()), file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("tightfit: interrupted", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "Command", "CliError", "build_parser", "main"]
