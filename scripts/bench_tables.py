"""Print the markdown tables of docs/benchmarks/*.md from the results files in benchmarks/results/latest/.

    python scripts/bench_tables.py estimate fewbit sketch solvers     # or any subset
    python scripts/bench_tables.py --results /tmp/trial/latest fewbit  # another results folder

The docs pages quote these tables; rerun this after `make bench-<area>` to refresh them. Every table is
preceded by a line naming its results file and its conditions (device, threads, versions, commit, load).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

LATEST = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "latest"
MiB, GiB = 2**20, 2**30


def load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def size(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.2f} MiB"


def conditions(d: dict[str, Any]) -> str:
    c = d.get("conditions", {})
    load_s = c.get("load_avg_start", [None])[0]
    load_e = c.get("load_avg", [None])[0]
    loads = "" if load_e is None else f", load {load_s:.1f} at start / {load_e:.1f} at end"
    commit = (d.get("commit") or "?")[:7] + (" (dirty tree)" if d.get("dirty") else "")
    threads = d.get("settings", {}).get("threads", c.get("threads"))
    return (
        f"`benchmarks/results/latest/{d['name']}.json`: {d.get('device')}, {threads} thread(s), "
        f"torch {d.get('torch_version')}, tightfit {d.get('tightfit_version')}, commit {commit}, "
        f"{c.get('utc', '?')} UTC{loads}"
    )


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- pages
def estimate(folder: Path) -> str:
    d = load(folder, "estimate")
    if d is None:
        return "(no estimate.json)"
    e, s = d["estimate"], d["settings"]
    rows = [
        ["model", f"{s['model']}, batch {s['batch']}, seq {s['seq']}, AdamW, fp32, train mode (dropout on)"],
        ["parameters", f"{e['params'] / 1e9:.3f} B ({size(e['params_bytes'])})"],
        ["optimizer state", size(e["optimizer_bytes"])],
        ["activations saved for backward", size(e["activations_bytes"])],
        ["peak of the step", f"{size(e['peak_bytes'])} ({e['peak_phase']}, {e['peak_op']})"],
        [
            "FLOPs counted vs 6·N·tokens",
            f"{e['flops'] / 1e12:.1f} vs {e['six_n_tokens_flops'] / 1e12:.1f} TFLOP "
            f"(×{e['flops_ratio']:.2f})",
        ],
        ["time of the estimate", f"{e['wall_s']:.1f} s wall, {e['cpu_s']:.1f} s CPU"],
        ["process max RSS", size(e["max_rss_bytes"])],
    ]
    return conditions(d) + "\n\n" + table(["", ""], rows)


def fewbit(folder: Path) -> str:
    out = []
    for name in ("fewbit_ops_t1", "fewbit_ops_t2"):
        d = load(folder, name)
        if d is None:
            out.append(f"(no {name}.json)")
            continue
        rows_by_op: dict[str, dict[Any, dict]] = {}
        for r in d["rows"]:
            rows_by_op.setdefault(r["op"], {})[r["bits"]] = r
        bits = [b for b in d["settings"]["bits"]]
        bl = " / ".join(str(b) for b in bits)
        rows = []
        for op, by_bits in rows_by_op.items():
            ref = by_bits["torch"]
            rows.append(
                [
                    f"{op} (torch {ref['fwd_bwd_ms']:.1f} ms)",
                    " / ".join(f"{by_bits[b]['saved_vs_torch']:.3f}" for b in bits),
                    " / ".join(f"{by_bits[b]['time_vs_torch']:.2f}" for b in bits),
                ]
            )
        out.append(
            conditions(d)
            + f"; {d['settings']['repeats']} interleaved rounds, n = {d['settings']['n']:,}\n\n"
            + table(["op", f"saved vs torch at b = {bl}", f"fwd+bwd time vs torch at b = {bl}"], rows)
        )
        k = d.get("kernels")
        if k:
            krows = [
                [
                    r["backend"],
                    f"{r['encode_ms']:.1f}",
                    f"{r['decode_mul_ms']:.1f}",
                    "yes" if r["same_as_reference"] else "NO",
                ]
                for r in k["rows"]
            ]
            out.append(
                f"codec kernels alone ({name}), {k['bits']} bits, "
                f"inductor compile {k['inductor_compile_s']:.0f} s:"
                "\n\n" + table(["backend", "encode ms", "decode_mul ms", "same result as reference"], krows)
            )
    d = load(folder, "fewbit_models")
    if d is None:
        out.append("(no fewbit_models.json)")
    else:
        rows = []
        for m in d["models"]:
            if "data_missing" in m:
                rows.append([m["model"], "data missing", "", "", "", "", "", ""])
                continue
            for i, r in enumerate(m["rows"]):
                rows.append(
                    [
                        m["model"] if i == 0 else "",
                        r["variant"],
                        size(r["peak_bytes"]),
                        f"{r['peak_vs_base']:.3f}",
                        size(r["saved_activation_bytes"]),
                        f"{r['saved_vs_base']:.3f}",
                        f"{r['step_time_median_s']:.3f} s",
                        f"{r['time_vs_base']:.2f}",
                    ]
                )
        head = ["model", "variant", "peak", "vs base", "saved activations", "vs base", "step time", "vs base"]
        out.append(conditions(d) + f"; {d['settings']['rounds']} interleaved rounds\n\n" + table(head, rows))
    for name in ("fewbit_convergence_minilm", "fewbit_convergence_reduced", "fewbit_convergence_fashion"):
        d = load(folder, name)
        if d is None:
            out.append(f"(no {name}.json)")
            continue
        for task in d["tasks"].values():
            if "data_missing" in task:
                out.append(f"{conditions(d)}\n\n{task['title']}: data missing: {task['data_missing']}")
                continue
            rows = [
                [
                    "exact (baseline)" if v["variant"] == "baseline" else v["variant"],
                    f"{100 * v['test_accuracy']:.2f}%",
                    "" if v["delta_points"] is None else f"{v['delta_points']:+.1f}",
                    f"{v['loss_last10']:.3f}",
                    size(v["peak_bytes"]),
                    f"{v['step_time_median_s']:.2f} s",
                ]
                for v in task["variants"]
            ]
            setup = ", ".join(
                f"{k} {task[k]}"
                for k in ("steps", "batch_size", "max_len", "epochs", "lr", "seed", "n_train", "n_test")
                if k in task
            )
            out.append(
                f"{conditions(d)}\n\n{task['title']} ({setup}):\n\n"
                + table(
                    [
                        "GELU",
                        "test accuracy",
                        "Δ points",
                        "loss (last 10 steps)",
                        "step peak",
                        "step time (median)",
                    ],
                    rows,
                )
            )
    return "\n\n".join(out)


def _ratio_group(rows: list[dict], key: Callable[[dict], str]) -> str:
    return " / ".join(key(r) for r in rows)


def sketch(folder: Path) -> str:
    out = []
    d = load(folder, "sketch_layer")
    if d is None:
        out.append("(no sketch_layer.json)")
    else:
        base = d["rows"][0]
        groups: dict[str, list[dict]] = {}
        for r in d["rows"][1:]:
            groups.setdefault(r["sketch"], []).append(r)
        rows = [
            [
                "nn.Linear",
                size(base["saved_bytes"]),
                "1.000",
                size(base["live_after_forward_bytes"]),
                f"{base['fwd_bwd_ms']:.0f} ms",
                "1.00",
            ]
        ]
        for sk, rs in groups.items():
            ratios = " / ".join(f"{r['ratio']:g}" for r in rs)
            rows.append(
                [
                    f"{sk}@{ratios}",
                    _ratio_group(rs, lambda r: f"{r['saved_bytes'] / MiB:.2f}") + " MiB",
                    _ratio_group(rs, lambda r: f"{r['saved_vs_linear']:.2f}"),
                    _ratio_group(rs, lambda r: f"{r['live_after_forward_bytes'] / MiB:.1f}") + " MiB",
                    _ratio_group(rs, lambda r: f"{r['fwd_bwd_ms']:.0f}") + " ms",
                    _ratio_group(rs, lambda r: f"{r['time_vs_linear']:.2f}"),
                ]
            )
        s = d["settings"]
        out.append(
            conditions(d)
            + f"; layer {s['d_in']} → {s['d_out']}, N = {s['tokens']} tokens, {s['dtype']}, {s['repeats']} "
            f"interleaved rounds; peak of forward+backward {size(base['peak_bytes'])} in every variant "
            f"(max ratio {max(r['peak_vs_linear'] for r in d['rows']):.3f})\n\n"
            + table(
                ["variant", "saved for backward", "ratio", "live after forward", "fwd+bwd time", "ratio"],
                rows,
            )
        )
    d = load(folder, "sketch_convergence_reduced")
    if d is None:
        out.append("(no sketch_convergence_reduced.json)")
    elif "data_missing" in d:
        out.append(f"{conditions(d)}\n\ndata missing: {d['data_missing']}")
    else:
        vs = {v["variant"]: v for v in d["variants"]}
        base = vs.get("baseline")
        sketches: dict[str, list[dict]] = {}
        for name, v in vs.items():
            if name != "baseline":
                sketches.setdefault(name.partition("@")[0], []).append(v | {"ratio": name.partition("@")[2]})
        rows = []
        if base:
            rows.append(
                [
                    "none (baseline)",
                    f"{base['test_accuracy']:.3f}",
                    f"{base['loss_last10']:.3f}",
                    size(base["saved_activation_bytes"]),
                    size(base["step_peak_bytes"]),
                ]
            )
        ratios = ""
        for sk, rs in sketches.items():
            ratios = " / ".join(r["ratio"] for r in rs)
            rows.append(
                [
                    sk,
                    _ratio_group(rs, lambda r: f"{r['test_accuracy']:.3f}"),
                    _ratio_group(rs, lambda r: f"{r['loss_last10']:.3f}"),
                    _ratio_group(
                        rs, lambda r: f"{r['saved_activation_bytes'] / base['saved_activation_bytes']:.3f}"
                    )
                    if base
                    else "",
                    _ratio_group(rs, lambda r: size(r["step_peak_bytes"])),
                ]
            )
        s = d["settings"]
        out.append(
            conditions(d)
            + f"; {s['steps']} steps, batch {s['batch_size']}, max_len {s['max_len']}, lr {s['lr']}, "
            f"seed {s['seed']}\n\n"
            + table(
                [
                    f"sketch (ratio {ratios})",
                    "test accuracy",
                    "loss (last 10 steps)",
                    "saved activations (baseline: bytes; sketches: vs baseline)",
                    "step peak",
                ],
                rows,
            )
        )
        steps = {k: v["step_time_median_s"] for k, v in vs.items()}
        if base and base["step_time_median_s"]:
            rel = [t / base["step_time_median_s"] for k, t in steps.items() if k != "baseline" and t]
            out.append(
                f"step time: baseline {base['step_time_median_s']:.2f} s (median); sketches "
                f"{min(rel):.2f}–{max(rel):.2f}× (median of their ratios {statistics.median(rel):.2f}×)"
            )
    return "\n\n".join(out)


def solvers(folder: Path) -> str:
    d = load(folder, "solvers")
    if d is None:
        return "(no solvers.json)"
    t = d["tables"]
    out = [conditions(d)]
    if "chains" in t:
        by_l: dict[int, list[dict]] = {}
        for r in t["chains"]:
            by_l.setdefault(r["L"], []).append(r)
        rows = []
        for L, rs in by_l.items():
            ok = [r for r in rs if not r.get("infeasible")]
            solve = max((r["solve_s"] for r in ok), default=0.0)
            cpu = max((r["cpu_s"] for r in ok), default=0.0)
            rows.append(
                [
                    L,
                    rs[0]["slots"],
                    f"{solve:.3g} / {cpu:.3g} s",
                    " / ".join(
                        "infeasible" if r.get("infeasible") else f"{100 * r['overhead']:+.1f}%" for r in rs
                    ),
                    " / ".join("" if r.get("infeasible") else f"{r['peak_over_budget']:.2f}" for r in rs),
                ]
            )
        fr = " / ".join(f"{100 * r['budget_frac']:.0f}" for r in t["chains"][:3])
        out.append(
            "Chains (Rotor DP):\n\n"
            + table(
                [
                    "chain L",
                    "slots",
                    "solve time (wall / CPU, slowest budget)",
                    f"overhead at {fr}% of the no-remat peak",
                    "peak / budget",
                ],
                rows,
            )
        )
    if "dags" in t:
        cells: dict[tuple[int, float], dict[str, str]] = {}
        for r in t["dags"]:
            if r["overhead"] is not None:
                text = f"{100 * r['overhead']:+.1f}%"
                if r["solver"] == "ilp exact":
                    text += (
                        ", optimal"
                        if r.get("optimal")
                        else (
                            f", gap {100 * r['gap']:.1f}% (limit hit)"
                            if r.get("gap") is not None
                            else ", limit hit"
                        )
                    )
                text += f" ({r['solve_s']:.2f} s)"
            else:
                note = r["note"] or "no answer"
                if note.startswith("no answer") and "Time limit" in note:
                    text = "no solution within the limit"
                elif note.startswith("no answer"):
                    text = "no schedule within the budget"
                else:
                    text = note
                if r["solve_s"] is not None and not note.startswith("skipped"):
                    text += f" ({r['solve_s']:.1f} s)"
            cells.setdefault((r["nodes"], r["budget_frac"]), {})[r["solver"]] = text
        rows = [
            [
                f"{n} ({100 * f:.0f}%)",
                c.get("ilp exact", ""),
                c.get("ilp lp+rounding", ""),
                c.get("lower-set DP", ""),
            ]
            for (n, f), c in cells.items()
        ]
        limit = d["settings"]["ilp_limit"]
        out.append(
            "DAGs (budget as % of the no-remat peak; overhead, solve time):\n\n"
            + table(
                ["DAG nodes (budget)", f"ILP exact ({limit:g} s limit)", "LP + rounding", "lower-set DP"],
                rows,
            )
        )
    if "wide_dags" in t:
        rows = [
            [
                r["nodes"],
                f"{100 * r['budget_frac']:.0f}%",
                f"infeasible in the family (min {100 * r['min_budget_frac']:.1f}%)"
                if r.get("infeasible")
                else f"{100 * r['overhead']:+.1f}%",
                f"{r['solve_s']:.2f} s",
                r.get("n_sets", ""),
            ]
            for r in t["wide_dags"]
        ]
        out.append(
            "Wide DAGs (4 parallel branches), lower-set DP:\n\n"
            + table(["nodes", "budget", "overhead", "solve time", "sets in the family"], rows)
        )
    if "rnn" in t:
        r = t["rnn"]
        rows = [
            [
                f"{100 * b['budget_frac']:.0f}% of store-all",
                f"{100 * b['peak_frac']:.1f}%",
                f"{100 * b['overhead']:+.1f}%",
                f"{b['solve_s']:.2f} s",
            ]
            for b in r["budgets"]
        ]
        rv = r["revolve"]
        rows.append([f"Revolve, {rv['checkpoints']} checkpoints", "", f"{100 * rv['overhead']:+.1f}%", ""])
        out.append(
            f"RNN over T = {r['T']} identical steps (BPTT DP):\n\n"
            + table(["budget", "peak", "time overhead", "solve time"], rows)
        )
    return "\n\n".join(out)


PAGES = {"estimate": estimate, "fewbit": fewbit, "sketch": sketch, "solvers": solvers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pages", nargs="*", default=list(PAGES), choices=list(PAGES))
    ap.add_argument("--results", type=Path, default=LATEST, help="folder of the results files")
    a = ap.parse_args()
    for page in a.pages:
        print(f"<!-- {page} -->\n{PAGES[page](a.results)}\n")


if __name__ == "__main__":
    main()
