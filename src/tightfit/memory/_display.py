"""How a `MemoryReport` prints: rich tables rendered to plain text.

Kept apart from `tightfit.memory.report`, which holds the numbers and their JSON form, so the data class
reads as data; ``MemoryReport.__str__`` calls `render_memory_report`.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from tightfit.sizes import format_size

if TYPE_CHECKING:  # for annotations only: at run time the report module imports this one
    from tightfit.memory.report import MemoryReport


def to_text(renderable: object, width: int = 100) -> str:
    """Render a rich object to plain text (what print(report) shows)."""
    buffer = io.StringIO()
    Console(file=buffer, width=width, force_terminal=False, color_system=None).print(renderable)
    return buffer.getvalue().rstrip("\n")


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _module_rows(report: MemoryReport, max_rows: int = 14) -> list[tuple[str, int]]:
    """Modules to show: the root's children, expanding any that holds most of the activations, with
    numbered siblings (a ModuleList of blocks) folded into one row such as ``h.{0..47}``."""
    children: dict[str, list[str]] = {}
    for path in report.per_module:
        if path == "<outside>":
            continue
        parts = path.split(".") if path else []
        for depth in range(len(parts)):
            parent, child = ".".join(parts[:depth]), ".".join(parts[: depth + 1])
            siblings = children.setdefault(parent, [])
            if child not in siblings:
                siblings.append(child)
    total = report.activations_bytes
    rows: list[tuple[str, int]] = []
    frontier = [""]
    while frontier and len(rows) < max_rows:
        path = frontier.pop(0)
        kids = children.get(path, [])
        if path and (not kids or report.inclusive_saved(path) < 0.5 * total):
            rows.append((path, report.inclusive_saved(path)))
            continue
        if path and report.per_module.get(path, 0):
            rows.append((f"{path} (own ops)", report.per_module[path]))
        numbered = [k for k in kids if k.rpartition(".")[2].isdigit()]
        if len(numbered) > 3:
            indices = sorted(int(k.rpartition(".")[2]) for k in numbered)
            prefix = f"{path}." if path else ""
            label = f"{prefix}{{{indices[0]}..{indices[-1]}}} ({len(numbered)} modules)"
            rows.append((label, sum(report.inclusive_saved(k) for k in numbered)))
            kids = [k for k in kids if k not in numbered]
        frontier = kids + frontier
    rows += [(path, report.inclusive_saved(path)) for path in frontier[: max(0, max_rows - len(rows))]]
    if "<outside>" in report.per_module:
        rows.append(("<outside any module>", report.per_module["<outside>"]))
    return rows


def render_memory_report(report: MemoryReport, width: int = 100) -> str:
    """The report as a readable table: categories, peak and where it happens, activations by module."""
    title = f"{report.model} on {report.device}" + (
        " (estimated, FakeTensorMode)" if report.estimated else ""
    )
    if report.world_size > 1 or report.parallel is not None:
        title += f", rank {report.rank} of {report.world_size}"
        if report.parallel is not None:
            title += f" ({report.parallel})"
    summary = Table(title=title, show_header=True, header_style="bold")
    summary.add_column("what")
    summary.add_column("bytes", justify="right")
    summary.add_column("of peak", justify="right")
    for name, value in (
        ("parameters", report.params_bytes),
        ("buffers", report.buffers_bytes),
        ("gradients", report.grads_bytes),
        ("optimizer state", report.optimizer_bytes),
        ("inputs", report.inputs_bytes),
        ("activations saved for backward", report.activations_bytes),
    ):
        summary.add_row(name, format_size(value), _pct(value, report.peak_bytes))
    summary.add_row(
        "[bold]peak live tensors[/bold]", f"[bold]{format_size(report.peak_bytes)}[/bold]", "100%"
    )
    where = f"during {report.peak_phase}, op {report.peak_op}"
    if report.peak_module is not None:
        where += f", in module '{report.peak_module or '<root>'}'"
    lines = [to_text(summary, width), f"peak {format_size(report.peak_bytes)} {where}"]
    if len(report.peak_by_device) > 1 or any(d != "cpu" for d in report.peak_by_device):
        devices = ", ".join(f"{d} {format_size(v)}" for d, v in report.peak_by_device.items())
        lines.append(f"peak by device: {devices}")
    if len(report.ranks) > 1:
        ranks = ", ".join(f"rank {r.rank} {format_size(r.peak_bytes)} ({r.peak_phase})" for r in report.ranks)
        lines.append(f"peak by rank: {ranks}")
    phases = ", ".join(f"{k} {format_size(v)}" for k, v in report.phase_peaks.items() if k != "run")
    if phases:
        lines.append(f"peak by phase: {phases}")
    extra = f"FLOPs per step: {report.flops:.3e}"
    if report.step_time is not None:
        extra += f"; step time {report.step_time * 1e3:.1f} ms"
    lines.append(extra)
    if report.per_module:
        by_module = Table(title="activations saved for backward, by module", header_style="bold")
        by_module.add_column("module")
        by_module.add_column("saved", justify="right")
        by_module.add_column("share", justify="right")
        for path, nbytes in _module_rows(report):
            by_module.add_row(path, format_size(nbytes), _pct(nbytes, report.activations_bytes))
        lines.append(to_text(by_module, width))
    return "\n".join(lines)
