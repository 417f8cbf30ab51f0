"""Plot live memory over one training step, without remat and with a plan (``tightfit plan --plot``)."""

from __future__ import annotations

from typing import Any

from tightfit.remat.plan import Plan


def plot_memory(planner: Any, plan: Plan, path: str, *, title: str = "one training step") -> None:
    """Measure both steps with the ruler's timeline and save a figure to ``path`` (format from suffix).

    The x axis is the op count (the plan runs more ops: its recomputation), the y axis live MiB; the
    budget is a dashed line; backward regions are shaded.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'tightfit[plot]'") from err

    mib = 2**20
    runs = [("no remat", planner.timeline(None)), (f"plan: {plan.summary()}", planner.timeline(plan.options))]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for (label, points), color in zip(runs, ("tab:gray", "tab:blue")):
        xs = [p.index for p in points]
        ys = [p.live_bytes / mib for p in points]
        peak = max(ys) if ys else 0.0
        ax.plot(xs, ys, color=color, lw=1.2, label=f"{label} (peak {peak:.1f} MiB)")
        backward = [p.index for p in points if p.phase == "backward"]
        if backward:
            ax.axvspan(min(backward), max(backward), color=color, alpha=0.06)
    ax.axhline(plan.budget / mib, color="tab:red", ls="--", lw=1, label=f"budget {plan.budget / mib:.1f} MiB")
    ax.set_xlabel("op (shaded: backward)")
    ax.set_ylabel("live tensors (MiB)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
