"""``tightfit models``: list the built-in models, and say how to bring one's own."""

from __future__ import annotations

import argparse

HELP = "list the built-in models"


def configure(p: argparse.ArgumentParser) -> None:
    """--all: also list the -tiny test variants."""
    p.add_argument("--all", action="store_true", help="include the -tiny test variants")


def run(args: argparse.Namespace) -> int:
    """Print one line per model (name, description); exit status 0."""
    from tightfit import zoo  # the zoo imports torch: only when a command runs, not for --help

    for name in zoo.names(include_tiny=args.all):
        print(f"{name:20s} {zoo.spec(name).description}")
    print("\nor a model of your own: path/to/file.py:factory (returning a module, or (module, batch))")
    return 0
