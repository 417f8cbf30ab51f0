"""Solve times and time overheads of the rematerialization solvers (pure algorithms, no torch).

Run: ``python -m benchmarks.solvers [--quick]`` (results ``solvers``, ``--quick``: ``solvers_quick``).
Prints four tables:

1. chains (Rotor DP) of L in {12, 48, 100, 500} stages at budgets of 25/50/75% of the no-remat peak;
2. DAGs of {20, 50, 100, 300} nodes: Checkmate ILP exact (HiGHS, time limit), ILP LP-relaxation+rounding,
   and the lower-set DP (exact family when small, approximate family otherwise), same budgets;
2b. wide DAGs of {40, 100, 300} nodes (4 parallel branches): the lower-set DP's approximate family;
3. an RNN over T = 1000 identical steps at 5% of store-all memory (BPTT DP), beside Gruslys et al.'s headline.

"overhead" = schedule time / no-remat time - 1 under the solvers' cost model (not a measured step time).
Problems are seeded random instances shaped like real networks (see ``chain_problem``/``dag_problem``).
Solve times are wall-clock medians on whatever machine runs this; on a shared machine they are noisy.

Results: benchmarks/results/latest/<--results>.{json,txt}.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any

import numpy as np

from benchmarks.common import results
from tightfit.remat.solvers import (
    Chain,
    Dag,
    InfeasibleBudget,
    revolve,
    simulate,
    solve_bptt,
    solve_chain,
    solve_dag_ilp,
    solve_dag_lowerset,
    store_all_peak,
    strategy_ops,
)

FRACS = (0.25, 0.50, 0.75)
ROCKMATE_NOTE = (
    "for comparison: Rockmate's planner (HILP on PuLP/CBC) did not finish planning a 4-layer "
    "toy GPT in > 9 minutes on a CPU machine like this one (333 CBC solves, 237 s of CBC time; "
    "shared/research/remat-peers.md)"
)


def chain_problem(L: int, seed: int = 0) -> Chain:
    """Transformer-like stages: activations 1-4 units, tapes 4-12x larger, backward about 2x forward."""
    rng = np.random.default_rng(seed)
    fwd = rng.uniform(0.5, 1.5, L)
    return Chain(
        fwd,
        fwd * rng.uniform(1.6, 2.4, L),
        rng.uniform(1, 4, L),
        rng.uniform(4, 12, L),
        output_size=0.0,
        fwd_overhead=rng.uniform(0, 1, L),
        bwd_overhead=rng.uniform(0, 2, L),
    )


def dag_problem(n: int, seed: int = 0) -> Dag:
    """A backbone with residual skips every 2-4 nodes and occasional 2-way branches (attention-like)."""
    rng = np.random.default_rng(seed)
    deps: list[list[int]] = [[]]
    for v in range(1, n):
        d = {v - 1}
        if v >= 3 and rng.random() < 0.35:
            d.add(int(v - rng.integers(2, min(5, v) + 1)))
        deps.append(sorted(d))
    bdeps = [sorted(set(d) | ({v} if rng.random() < 0.3 else set())) for v, d in enumerate(deps)]
    fwd = rng.uniform(0.5, 1.5, n)
    return Dag(fwd, fwd * 2, rng.uniform(1, 6, n), deps, bdeps)


def wide_dag_problem(n: int, width: int = 4, seed: int = 0) -> Dag:
    """``width`` parallel branches that merge every third layer: far more than 3000 lower sets."""
    rng = np.random.default_rng(seed)
    deps: list[list[int]] = [[]]
    for v in range(1, n):
        layer = (v - 1) // width
        if (v - 1) % width == 0 and layer % 3 == 0 and layer > 0:
            deps.append(sorted({v - 1 - k for k in range(1, width + 1) if v - 1 - k >= 0} | {v - 1}))
        else:
            deps.append([max(0, v - width)])
    fwd = rng.uniform(0.5, 1.5, n)
    return Dag(fwd, 2 * fwd, rng.uniform(1, 6, n), deps)


def wide_table(sizes: list[int]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    print("\n## 2b. Wide DAGs (4 parallel branches, > 3000 lower sets): lower-set DP, approximate family")
    print(f"{'nodes':>5} {'budget':>6} | {'solve s':>8} {'overhead':>9}  note")
    for n in sizes:
        d = wide_dag_problem(n)
        full, base = simulate(d, strategy_ops(d, [(1 << n) - 1]))
        for f in FRACS:
            t0 = time.perf_counter()
            try:
                s = solve_dag_lowerset(d, f * full)
            except InfeasibleBudget as e:
                print(f"{n:>5} {int(100 * f):>5}% | {time.perf_counter() - t0:8.2f} {'':>9}  "
                      f"infeasible in the family; min budget {100 * e.min_budget / full:.1f}%")
                out.append({"nodes": n, "budget_frac": f, "solve_s": time.perf_counter() - t0,
                            "infeasible": True, "min_budget_frac": e.min_budget / full})
                continue
            dt = time.perf_counter() - t0
            print(f"{n:>5} {int(100 * f):>5}% | {dt:8.2f} {fmt_overhead(s, base):>9}  "
                  f"{s.solver}, {s.info['n_sets']} sets in the family")
            out.append({"nodes": n, "budget_frac": f, "solve_s": dt, "overhead": s.time / base - 1,
                        "solver": s.solver, "n_sets": s.info["n_sets"]})
    return out


def timed(fn, repeat: int):
    """Median wall-clock and CPU (process) seconds over ``repeat`` runs; CPU time is less load-sensitive."""
    times, cpus, out = [], [], None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return out, statistics.median(times), statistics.median(cpus)


def fmt_overhead(s, base: float) -> str:
    return f"{100 * (s.time / base - 1):+6.1f}%"


def chains_table(sizes: list[int]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    print("\n## 1. Chains: Rotor DP (persistent schedules, options, overheads)")
    print(f"{'L':>5} {'slots':>5} {'budget':>7} | {'solve s':>8} {'cpu s':>7} {'overhead':>9} "
          f"{'peak/budget':>11}  note")
    for L in sizes:
        c = chain_problem(L)
        full = store_all_peak(c)
        base = sum(c.fwd_time) + sum(c.bwd_time)
        slots = 500 if L <= 100 else 60
        for f in FRACS:
            b = f * full
            try:
                s, dt, cpu = timed(
                    lambda c=c, b=b, slots=slots: solve_chain(c, b, slots=slots), 3 if L <= 100 else 1
                )
            except InfeasibleBudget as e:
                print(
                    f"{L:>5} {slots:>5} {int(100 * f):>6}% | {'':>8} {'':>7} {'infeasible':>9} {'':>11}  "
                    f"min budget = {100 * e.min_budget / full:.1f}% of no-remat peak"
                )
                out.append({"L": L, "slots": slots, "budget_frac": f, "infeasible": True,
                            "min_budget_frac": e.min_budget / full})
                continue
            note = s.solver
            if s.peak / b < 0.5:
                note += " (sizes << budget/slots: rounding up to whole slots wastes the budget)"
            print(
                f"{L:>5} {slots:>5} {int(100 * f):>6}% | {dt:8.3f} {cpu:7.3f} {fmt_overhead(s, base):>9} "
                f"{s.peak / b:11.3f}  {note}"
            )
            out.append({"L": L, "slots": slots, "budget_frac": f, "solve_s": dt, "cpu_s": cpu,
                        "overhead": s.time / base - 1, "peak_over_budget": s.peak / b, "note": note})
    return out


def dag_table(sizes: list[int], ilp_limit: float, max_ilp_vars: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    print("\n## 2. DAGs: Checkmate ILP (HiGHS) exact / LP-rounding, Kusumoto lower-set DP")
    print(f"{'nodes':>5} {'budget':>6} | {'solver':<22} {'solve s':>8} {'overhead':>9} {'gap':>7}  note")
    for n in sizes:
        d = dag_problem(n)
        full, base = simulate(d, strategy_ops(d, [(1 << n) - 1]))  # plain autograd: one segment
        T = 2 * n
        est_vars = T * (T + 1) + T * (T + 1) // 2 + T * sum(len(x) for x in d.deps) * 2
        for f in FRACS:
            b = f * full
            rows = []
            for name, fn in (
                ("ilp exact", lambda d=d, b=b: solve_dag_ilp(d, b, exact=True, time_limit=ilp_limit)),
                ("ilp lp+rounding", lambda d=d, b=b: solve_dag_ilp(d, b, exact=False, time_limit=ilp_limit)),
                ("lower-set DP", lambda d=d, b=b: solve_dag_lowerset(d, b)),
            ):
                if name.startswith("ilp") and est_vars > max_ilp_vars:
                    rows.append(
                        (name, None, None, f"skipped: ~{est_vars:,} ILP variables (> {max_ilp_vars:,})")
                    )
                    continue
                t0 = time.perf_counter()
                try:
                    s = fn()
                except InfeasibleBudget as e:
                    rows.append(
                        (
                            name,
                            time.perf_counter() - t0,
                            None,
                            f"infeasible; min budget {100 * e.min_budget / full:.1f}%",
                        )
                    )
                    continue
                except RuntimeError as e:
                    rows.append((name, time.perf_counter() - t0, None, f"no answer: {str(e)[:60]}"))
                    continue
                dt = time.perf_counter() - t0
                assert simulate(d, s)[0] <= b + 1e-9
                note = s.solver
                if name == "ilp exact":
                    note += " (optimal)" if s.optimal else f" (time limit {ilp_limit:g}s hit)"
                    note += f", {s.info['n_vars']:,} vars"
                if name == "lower-set DP":
                    note += f", {s.info['n_sets']} lower sets"
                rows.append((name, dt, s, note))
            for name, dt, s, note in rows:
                gap = "" if s is None or s.gap is None else f"{100 * s.gap:6.1f}%"
                ov = "" if s is None else fmt_overhead(s, base)
                dts = "" if dt is None else f"{dt:8.2f}"
                print(f"{n:>5} {int(100 * f):>5}% | {name:<22} {dts:>8} {ov:>9} {gap:>7}  {note}")
                out.append({
                    "nodes": n, "budget_frac": f, "solver": name, "solve_s": dt,
                    "overhead": None if s is None else s.time / base - 1,
                    "gap": None if s is None else s.gap,
                    "optimal": None if s is None else getattr(s, "optimal", None),
                    "note": note,
                })
    print(ROCKMATE_NOTE)
    return out


def rnn_table(T: int) -> dict[str, Any]:
    out: dict[str, Any] = {"T": T, "budgets": []}
    print(f"\n## 3. RNN over T = {T} identical steps (BPTT DP = chain DP specialised to identical steps)")
    # An LSTM-like step: hidden state h = 1 unit; the step keeps ~4 units (gates, cell) for its backward
    # besides its input; backward ~2x forward.
    h, tape, f, bw = 1.0, 4.0, 1.0, 2.0
    chain = Chain.homogeneous(T, f, bw, h, tape)
    full = store_all_peak(chain)
    base = T * (f + bw)
    for frac in (0.05, 0.10):
        b = frac * full
        s, dt, _ = timed(lambda b=b: solve_bptt(T, b, f, bw, h, tape), 1)
        print(
            f"budget {100 * frac:.0f}% of store-all ({b:.0f} of {full:.0f} units): solve {dt:.2f} s, "
            f"peak {100 * s.peak / full:.1f}% of store-all, time overhead {100 * (s.time / base - 1):+.1f}% "
            f"(forward-only recompute: {100 * (s.time - base) / (T * f):.1f}% of one forward pass)"
        )
        out["budgets"].append({"budget_frac": frac, "solve_s": dt, "peak_frac": s.peak / full,
                               "overhead": s.time / base - 1})
    slots = int(0.05 * full) - 4  # Revolve with the same memory as checkpoints (tape held once)
    r = revolve(T, slots)
    print(
        f"Revolve with {slots} checkpoints: {r.info['extra_forwards']} extra forwards "
        f"({100 * r.info['extra_forwards'] * f / base:+.1f}% time)"
    )
    print("Gruslys et al. (NeurIPS 2016) headline: T = 1000, -95% memory for +33% time per iteration")
    out["revolve"] = {"checkpoints": slots, "extra_forwards": r.info["extra_forwards"],
                      "overhead": r.info["extra_forwards"] * f / base}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    p.add_argument("--ilp-limit", type=float, default=30.0, help="HiGHS time limit per ILP (s)")
    p.add_argument("--max-ilp-vars", type=int, default=250_000)
    p.add_argument("--only", choices=("chains", "dags", "wide", "rnn"), help="run one table")
    p.add_argument("--results", default=None, help="name in results/latest/ (default solvers[_quick])")
    a = p.parse_args()
    tables: dict[str, Any] = {}
    with results.Transcript() as transcript:
        print(f"# tightfit solvers benchmark: {results.command_line()}")
        print(
            f"# python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
            f"load avg {os.getloadavg()[0]:.1f} (shared machine: timings are noisy)"
        )
        if a.only in (None, "chains"):
            tables["chains"] = chains_table([12, 48] if a.quick else [12, 48, 100, 500])
        if a.only in (None, "dags"):
            tables["dags"] = dag_table([20] if a.quick else [20, 50, 100, 300], a.ilp_limit, a.max_ilp_vars)
        if a.only in (None, "wide"):
            tables["wide_dags"] = wide_table([40] if a.quick else [40, 100, 300])
        if a.only in (None, "rnn"):
            tables["rnn"] = rnn_table(200 if a.quick else 1000)
    name = a.results or ("solvers_quick" if a.quick else "solvers") + (f"_{a.only}" if a.only else "")
    data = {"settings": vars(a) | {"numpy_version": np.__version__}, "tables": tables}
    results.say_written(results.write(name, data, text=transcript.text))


if __name__ == "__main__":
    main()
