"""The rematerialization benchmarks' harness: variants, exact peaks, gradient checks, paired comparisons.

Every variant of a benchmark is its own deep copy of one model, stepped the same way
(`benchmarks.common.steps.run_step`: grads set to None, forward, loss, backward). For each variant we measure

* the **exact peak** of live tensor bytes over one full training step, with the ruler
  (`tightfit.memory.LiveTracker`); parameters, buffers and the batch are counted, so the peak is absolute
  and "above params" subtracts the parameter bytes;
* the **step time**, as the median over round-robin rounds in which every variant runs once, the start
  position rotated each round (`benchmarks.common.timing.interleaved`), so that load on a shared machine
  hits all variants alike; the ratio is to the median of the no-remat baseline from the same rounds;
* the **gradients**, after `torch.manual_seed(seed)`, compared with `torch.equal` to those of the reference
  (the unmodified eager model, same seed): with dropout on, this also checks that recomputation replays
  the same random numbers.

Reprint a results file's tables: ``python -m benchmarks.remat.show benchmarks/results/latest/<name>.json``.

NOTE (compiled variants): a dispatch mode on the stack makes dynamo skip the frame unless the mode says
`ignore_compile_internals()`; the trackers here do, and each compiled variant counts its forward/backward
graph calls so the table can show that the compiled graphs really ran while we measured.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import results
from benchmarks.common.steps import (
    MiB,
    Reference,
    grads,
    measure_step,
    run_step,
    tensors_of,
)
from benchmarks.common.timing import interleaved, paired_ratios, paired_summary, timed
from tightfit.memory.profile import unique_bytes
from tightfit.sizes import format_size
from tightfit.testing import same_grads


# ------------------------------------------------------------------------------------------- the variants
@dataclass
class Variant:
    """One way to run the training step, with everything measured about it."""

    name: str
    family: str  # "baseline", "tightfit", "ckpt-every-k", "ckpt-seq", "compile", "tightfit+compile", ...
    step: Callable[[], Any] = field(repr=False)
    params: list[torch.Tensor] = field(repr=False)  # parameter objects, in the reference's order
    track: list[torch.Tensor] = field(
        repr=False
    )  # tensors that exist before the step (params, buffers, batch)
    budget: float | None = None  # the variant's own knob (bytes for tightfit, ratio for compile, k, segments)
    compiled: bool = False
    counts: dict[str, int] | None = None  # compiled fw/bw graph calls
    setup_s: float = 0.0  # planning / compile time (first steps)
    predicted_peak: int | None = None
    predicted_time: float | None = None
    note: str = ""
    plan_text: str = ""  # str(model.plan) for tightfit variants
    # measured
    peak: int | None = None
    params_bytes: int = 0
    times: list[float] = field(default_factory=list)
    grads_equal: bool | None = None
    grad_max_diff: float = 0.0
    buffers: list[torch.Tensor] = field(default_factory=list, repr=False)  # in the reference's order
    buffers_equal: bool | None = None  # running stats after one step (BatchNorm updated twice by recompute?)
    graphs_ran: bool | None = None
    after_forward: int | None = None  # live bytes above params/buffers/batch when the forward returns
    allocator_peak: int | None = None  # CUDA only: the caching allocator's peak above its start, one step

    @property
    def peak_above_params(self) -> int | None:
        return None if self.peak is None else self.peak - self.params_bytes

    @property
    def peak_above_start(self) -> int | None:
        """The ruler's peak above the tensors that exist before the step (the CUDA allocator's view)."""
        return None if self.peak is None else self.peak - unique_bytes(self.track)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else math.nan


def check_grads(v: Variant, ref: Reference, seed: int) -> None:
    """torch.equal of every parameter gradient (and buffer) against the reference; max |diff| if not.

    The variant's buffers are first reset to the reference's initial values, so warm-up steps (compile)
    do not matter; then one step, and the buffers after it must equal the reference's after its step.
    """
    if v.buffers:
        with torch.no_grad():
            for b, b0 in zip(v.buffers, ref.buffers_before):
                b.copy_(b0)
    torch.manual_seed(seed)
    v.step()
    if v.buffers:
        v.buffers_equal = same_grads(list(v.buffers), list(ref.buffers_after))
    got = grads(v.params)
    equal = same_grads(got, ref.grads)
    diff = 0.0
    if not equal:  # how far apart: the largest elementwise difference (inf when one side has no gradient)
        diff = math.inf if len(got) != len(ref.grads) else 0.0
        for a, b in zip(got, ref.grads):
            if (a is None) != (b is None):
                diff = math.inf
            elif a is not None and b is not None:
                diff = max(diff, (a.float() - b.float()).abs().max().item())
    v.grads_equal, v.grad_max_diff = equal, diff


def measure(v: Variant, seed: int) -> None:
    """Exact peak of one step of `v` (after its warm-up), checking compiled graphs ran under the ruler."""
    v.params_bytes = unique_bytes(v.params)
    before = dict(v.counts) if v.counts is not None else None
    torch.manual_seed(seed)
    v.peak, v.after_forward = measure_step(v.step, v.track)
    if before is not None:
        v.graphs_ran = all(v.counts[k] > before.get(k, 0) for k in ("fw", "bw"))
    if any(t.is_cuda for t in v.params):
        torch.manual_seed(seed)
        v.allocator_peak = cuda_allocator_peak(v.step)


def cuda_allocator_peak(step: Callable[[], Any]) -> int:
    """What CUDA's caching allocator says one step peaks at above what was allocated before it (grads freed
    first): a cross-check of the ruler's peak above the tracked tensors, rounded up to allocator blocks."""
    if hasattr(step, "zero"):
        step.zero()
    gc.collect()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def time_interleaved(
    variants: Sequence[Variant], rounds: int, warmup: int = 1, log: Callable | None = None
) -> None:
    """Round-robin timing: each round runs every variant once, start position rotated; appends to `.times`."""
    times = interleaved(variants, lambda v: timed(v.step), rounds, warmup=warmup, order="rotate", log=log)
    for v, ts in zip(variants, times):
        v.times.extend(ts)


def target_check(rows: Sequence[Variant], base: Variant, alpha: float = 0.05) -> list[dict[str, Any]]:
    """For each peer with correct gradients (the others are listed, not compared): the tightfit variant
    (same compiled-ness) with the highest measured peak at or below the peer's, i.e. the plan for that
    budget, not the luckiest timing among several, compared round by round. Verdict "win"/"LOSS" when a
    sign test over the paired rounds says so at ``alpha`` (5 rounds: only 5 of 5 qualifies), else "tie";
    prints a table, returns the rows."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="target: tightfit time <= peer time at equal or lower measured peak (paired rounds)")
    columns = (
        "peer",
        "peer peak MiB",
        "peer ratio",
        "tightfit at <= peak",
        "its peak MiB",
        "its ratio",
        "paired ratio (min-max)",
        "faster in",
        "verdict",
    )
    for c in columns:
        t.add_column(c, justify="left" if c in ("peer", "tightfit at <= peak", "verdict") else "right")
    checks = []
    for p in rows:
        if p.family.startswith("tightfit") or p.family == "baseline":
            continue
        if not p.grads_equal:
            checks.append({"peer": p.name, "verdict": "not compared: the peer's gradients are wrong"})
            t.add_row(
                p.name,
                f"{p.peak / MiB:.1f}",
                f"{p.median / base.median:.2f}",
                *["-"] * 5,
                "[red]peer gradients WRONG[/red]",
            )
            continue
        fam = "tightfit+compile" if p.compiled else "tightfit"
        cands = [v for v in rows if v.family == fam and v.grads_equal and v.peak <= p.peak]
        best = max(cands, key=lambda v: (v.peak, -v.median)) if cands else None
        row: dict[str, Any] = {
            "peer": p.name,
            "peer_peak_mib": round(p.peak / MiB, 1),
            "peer_ratio": round(p.median / base.median, 3),
            "tightfit": None,
            "verdict": "LOSS: no tightfit variant at <= this peak",
        }
        cells = ["-"] * 5 + [row["verdict"]]
        if best is not None:
            ratios = paired_ratios(best.times, p.times)
            paired = paired_summary(best.times, p.times, alpha)
            faster, n, verdict = paired["faster_rounds"], paired["rounds"], paired["verdict"]
            row |= {
                "tightfit": best.name,
                "tightfit_peak_mib": round(best.peak / MiB, 1),
                "tightfit_ratio": round(best.median / base.median, 3),
                **paired,
            }
            cells = [
                best.name,
                f"{best.peak / MiB:.1f}",
                f"{best.median / base.median:.2f}",
                f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
                f"{faster}/{n}",
                verdict,
            ]
        checks.append(row)
        t.add_row(p.name, f"{p.peak / MiB:.1f}", f"{p.median / base.median:.2f}", *cells)
    Console(width=170).print(t)
    return checks


def counting_aot_eager(budget: float | None, counts: dict[str, int]) -> Callable:
    """The real aot_eager backend (min-cut partitioner), with graph-call counters and its own memory budget.

    The budget is patched while the backend compiles (partitioning happens then); each variant gets a
    distinct backend object, so dynamo keeps one cache entry per variant.
    """
    import torch._functorch.config as fcfg
    from torch._dynamo.backends.debugging import aot_eager, boxed_nop

    def counting(kind: str) -> Callable:
        def compiler(gm, example_inputs):
            inner = boxed_nop(gm, example_inputs)

            def run(args):
                counts[kind] += 1
                return inner(args)

            run._boxed_call = True
            return run

        return compiler

    def backend(gm, example_inputs, **kwargs):
        patch = {} if budget is None else {"activation_memory_budget": budget}
        with fcfg.patch(**patch):
            return aot_eager(
                gm, example_inputs, fw_compiler=counting("fw"), bw_compiler=counting("bw"), **kwargs
            )

    return backend


def compile_variant(
    name: str,
    family: str,
    model: torch.nn.Module,
    params: list[torch.Tensor],
    batch: Any,
    loss_fn: Callable | None,
    budget: float | None,
    seed: int,
    warm_steps: int = 2,
    buffers: Sequence[torch.Tensor] = (),
) -> Variant:
    """`torch.compile(model, backend=aot_eager, activation_memory_budget=budget)`; compiles now (timed)."""
    import torch._dynamo
    import torch._functorch.config as fcfg

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4096
    )
    counts = {"fw": 0, "bw": 0}
    cmodel = torch.compile(model, backend=counting_aot_eager(budget, counts))
    step = run_step(cmodel, batch, loss_fn)
    patch = {} if budget is None else {"activation_memory_budget": budget}
    t0 = time.perf_counter()
    with fcfg.patch(**patch):
        for _ in range(warm_steps):
            torch.manual_seed(seed)
            step()
    setup = time.perf_counter() - t0
    v = Variant(
        name, family, step, params, tensors_of(model) + tensors_of(batch), budget, True, counts, setup
    )
    v.buffers = list(buffers)
    return v


# ------------------------------------------------------------------------------------------ reporting
def pareto_front(rows: Sequence[Variant]) -> set[str]:
    """Names of correct-gradient variants not dominated in (peak, median time)."""
    ok = [v for v in rows if v.grads_equal and v.peak is not None and v.times]
    front = set()
    for v in ok:
        if not any(
            (w.peak <= v.peak and w.median <= v.median) and (w.peak < v.peak or w.median < v.median)
            for w in ok
        ):
            front.add(v.name)
    return front


def rows_as_dicts(rows: Sequence[Variant], base: Variant) -> list[dict[str, Any]]:
    out = []
    front = pareto_front(rows)
    for v in rows:
        d = {
            "name": v.name,
            "family": v.family,
            "budget": v.budget,
            "compiled": v.compiled,
            "peak_bytes": v.peak,
            "peak_above_params_bytes": v.peak_above_params,
            "peak_above_params_mib": None if v.peak is None else round(v.peak_above_params / MiB, 2),
            "peak_mib": None if v.peak is None else round(v.peak / MiB, 2),
            "after_forward_mib": None if v.after_forward is None else round(v.after_forward / MiB, 2),
            "ruler_peak_above_start_bytes": v.peak_above_start,
            "cuda_allocator_peak_above_start_bytes": v.allocator_peak,
            "peak_pct_of_baseline": None if v.peak is None else round(100 * v.peak / base.peak, 1),
            "median_s": round(v.median, 4),
            "time_ratio": round(v.median / base.median, 3),
            "min_time_ratio": round(min(v.times) / min(base.times), 3) if v.times else None,
            "times_s": [round(t, 4) for t in v.times],
            "grads_equal": v.grads_equal,
            "grad_max_diff": v.grad_max_diff,
            "buffers_equal": v.buffers_equal,
            "graphs_ran_under_ruler": v.graphs_ran,
            "setup_s": round(v.setup_s, 2),
            "predicted_peak_bytes": v.predicted_peak,
            "predicted_time_s": v.predicted_time,
            "pareto": v.name in front,
            "note": v.note,
        }
        out.append(d)
    return out


def print_table(rows: Sequence[Variant], base: Variant, title: str) -> None:
    print_rows(rows_as_dicts(rows, base), title)


def print_rows(rows: Sequence[dict[str, Any]], title: str) -> None:
    """The results table (from `rows_as_dicts`, or the "rows" of a results JSON file)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    cols = (
        "variant",
        "budget",
        "peak MiB",
        "above params",
        "% base",
        "after fw",
        "pred. peak",
        "step s",
        "ratio",
        "min ratio",
        "grads",
        "setup s",
        "front",
    )
    for col in cols:
        t.add_column(col, justify="left" if col == "variant" else "right")
    for d in rows:
        b = d["budget"]
        if d["family"].startswith("tightfit") and b is not None:
            bs = format_size(b)
        else:
            bs = "" if b is None else f"{b:g}"
        grad = "==" if d["grads_equal"] else f"[red]WRONG {d['grad_max_diff']:.2g}[/red]"
        if d.get("buffers_equal") is False:
            grad += " [yellow]bufs≠[/yellow]"
        if d["compiled"] and d.get("graphs_ran_under_ruler") is False:
            grad += " [red](eager?)[/red]"
        pp = d.get("predicted_peak_bytes")
        af = d.get("after_forward_mib")
        mr = d.get("min_time_ratio")
        t.add_row(
            d["name"],
            bs,
            f"{d['peak_mib']:.1f}",
            f"{d['peak_above_params_mib']:.1f}",
            f"{d['peak_pct_of_baseline']:.1f}",
            "" if af is None else f"{af:.1f}",
            "" if pp is None else f"{pp / MiB:.1f}",
            f"{d['median_s']:.3f}",
            f"{d['time_ratio']:.2f}",
            "" if mr is None else f"{mr:.2f}",
            grad,
            f"{d['setup_s']:.1f}" if d["setup_s"] else "",
            "*" if d["pareto"] else "",
        )
    Console(width=170).print(t)


def show(path: str | Path) -> None:
    """Reprint a results JSON file's tables (`python -m benchmarks.remat.show FILE`)."""
    data = results.load(path)
    meta = data["meta"]
    utc = data.get("conditions", meta).get("utc", "")
    print_rows(data["rows"], f"{Path(path).name}: {meta.get('desc', '')} ({utc} UTC)")
    for key in ("target_check", "headline", "summary"):
        if meta.get(key):
            print(key, json.dumps(meta[key], indent=1))
    rows = [_variant_of(d) for d in data["rows"]]
    if any(v.family.startswith("tightfit") for v in rows) and all(v.times for v in rows):
        target_check(rows, next(v for v in rows if v.family == "baseline"))


def _variant_of(d: dict[str, Any]) -> Variant:
    """A measured variant rebuilt from a results row (enough for ``target_check``)."""
    return Variant(
        d["name"],
        d["family"],
        lambda: None,
        [],
        [],
        compiled=d["compiled"],
        peak=d["peak_bytes"],
        times=list(d.get("times_s") or []),
        grads_equal=d["grads_equal"],
    )


def write_results(
    stem: str, rows: Sequence[Variant], base: Variant, meta: dict[str, Any], title: str, device: Any = "cpu"
) -> dict[str, Path]:
    """results/latest/<stem>.{json,csv,png} (rows + meta; the provenance and conditions come from
    `benchmarks.common.results`) and the JSON in results/history/."""
    dicts = rows_as_dicts(rows, base)
    fig = pareto_figure(rows, base, title)
    try:
        return results.write(
            stem,
            {"meta": meta, "rows": dicts},
            device=device,
            csv_rows=[{k: v for k, v in d.items() if k != "times_s"} for d in dicts],
            figure=fig,
        )
    finally:
        if fig is not None:
            import matplotlib.pyplot as plt

            plt.close(fig)


def pareto_figure(rows: Sequence[Variant], base: Variant, title: str) -> Any:
    """Peak above params vs step-time ratio, one marker style per family; wrong grads drawn as x (None
    without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fams = sorted({v.family for v in rows})
    markers = dict(zip(fams, "osD^v<>ph*"))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=80)
    for fam in fams:
        for ok in (True, False):
            vs = [v for v in rows if v.family == fam and bool(v.grads_equal) == ok]
            if not vs:
                continue
            ax.scatter(
                [v.peak_above_params / MiB for v in vs],
                [v.median / base.median for v in vs],
                marker=markers[fam] if ok else "x",
                label=fam + ("" if ok else " (wrong grads)"),
                s=40,
            )
    ax.set_xlabel("measured peak above params (MiB)")
    ax.set_ylabel("step time / no-remat eager")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def meta_conditions() -> dict[str, Any]:
    """What the remat results' ``meta`` records beside the harness's provenance and conditions."""
    return {
        "accelerator": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "ruler": "tightfit.memory.LiveTracker",
        "note": "step times are medians of interleaved rounds; on a shared machine ratios move by ~±0.1",
    }
