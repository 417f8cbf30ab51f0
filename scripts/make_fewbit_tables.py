"""Generate the shipped few-bit derivative tables (deterministic) and print their errors.

    .venv/bin/python scripts/make_fewbit_tables.py            # writes src/tightfit/fewbit/data/tables.json
    .venv/bin/python scripts/make_fewbit_tables.py --check    # regenerates and compares, writes nothing
    .venv/bin/python scripts/make_fewbit_tables.py --timing   # fit times (median of 3), GELU/SiLU/Tanh

For every registry function with its own tables (entries with ``table_of`` share another's), at default
parameters, bits 1..8: smooth functions are fitted with ``tightfit.fewbit.fit(name, bits, "normal")``
(exact DP, default grid); piecewise-linear ones get their exact table. Each table stores its error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tightfit.fewbit.activations import ACTIVATIONS
from tightfit.fewbit.fit import fit
from tightfit.fewbit.tables import DATA_FILE, SHIPPED_BITS, Table, exact_table, table_summary

OUT = Path(__file__).resolve().parents[1] / "src" / "tightfit" / "fewbit" / "data" / DATA_FILE
FORMAT = 1


def make_table(name: str, bits: int) -> Table:
    """The shipped table for (name, bits): what this script writes, entry by entry (tests call this)."""
    spec = ACTIVATIONS[name]
    if spec.kind != "smooth":
        return exact_table(name)
    t = fit(name, bits, "normal")
    return Table(
        borders=t.borders, levels=t.levels, error=t.error, bits=t.bits, exact=False, right=t.right,
        name=name, params=dict(spec.defaults), weight=t.weight,
    )


def table_names() -> list[str]:
    return [n for n, s in ACTIVATIONS.items() if s.table_of is None]


def dumps(tables: list[Table]) -> str:
    """One table per line: readable diffs, exact float round trip (repr)."""
    head = {"format": FORMAT, "generator": "scripts/make_fewbit_tables.py", "torch": torch.__version__}
    lines = [json.dumps(t.to_dict(), separators=(",", ":")) for t in tables]
    return (json.dumps(head)[:-1] + ', "tables": [\n' + ",\n".join(lines) + "\n]}\n")


def timing(names: tuple[str, ...] = ("gelu", "silu", "tanh"), repeats: int = 3) -> int:
    """Median wall time of fit(name, bits) (one thread), runs interleaved across bit widths."""
    fit("gelu", 1)  # warm-up: imports, autograd
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):
        for name in names:
            for bits in SHIPPED_BITS:
                t0 = time.perf_counter()
                fit(name, bits, "normal")
                times.setdefault((name, bits), []).append(time.perf_counter() - t0)
    print(f"fit() wall time, median of {repeats} (s), torch threads=1")
    print(f"{'function':<10}" + "".join(f"{b:>8d}" for b in SHIPPED_BITS))
    for name in names:
        row = [sorted(times[(name, b)])[repeats // 2] for b in SHIPPED_BITS]
        print(f"{name:<10}" + "".join(f"{v:>8.2f}" for v in row))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the shipped file, write nothing")
    ap.add_argument("--only", nargs="*", help="restrict to these registry names (with --check)")
    ap.add_argument("--timing", action="store_true", help="time fit() for GELU/SiLU/Tanh, bits 1..8")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.timing:
        return timing()
    names = args.only or table_names()
    tables, timings = [], {}
    for name in names:
        for bits in SHIPPED_BITS:
            t0 = time.perf_counter()
            tables.append(make_table(name, bits))
            timings[(name, bits)] = time.perf_counter() - t0
            if ACTIVATIONS[name].kind != "smooth":
                break  # exact: one table serves every bit width
    print(table_summary(tables))
    slow4 = max((v for (n, b), v in timings.items() if b <= 4), default=0.0)
    slow8 = max((v for (n, b), v in timings.items() if b == 8), default=0.0)
    print(f"\nslowest fit: bits<=4 {slow4:.2f} s, bits=8 {slow8:.2f} s (one thread)")
    if args.check:
        shipped = {(d["name"], d["bits"]): d for d in json.loads(OUT.read_text())["tables"]}
        bad = [t for t in tables if shipped.get((t.name, t.bits)) != t.to_dict()]
        for t in bad:
            print(f"DIFFERS: {t.name} bits={t.bits}", file=sys.stderr)
        return 1 if bad else 0
    if args.only:
        ap.error("--only is for --check; the shipped file always holds every table")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(dumps(tables))
    print(f"wrote {len(tables)} tables to {OUT} ({OUT.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
