"""Reprint a remat results file's tables (rows, target check, headline) without rerunning anything.

    python -m benchmarks.remat.show benchmarks/results/latest/remat_gpt2_b8t256.json [more files ...]
    python -m benchmarks.remat.show remat_lstm            # a name in results/latest/
"""

from __future__ import annotations

import sys

from benchmarks.remat.harness import show


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.exit(__doc__)
    for path in args:
        show(path)


if __name__ == "__main__":
    main()
