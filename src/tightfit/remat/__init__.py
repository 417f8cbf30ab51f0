"""Rematerialization: recompute instead of store, on an optimal schedule under a memory budget.

`rematerialize` (and `Planner`, configured by a frozen `RematConfig`) measures an unmodified model's
blocks, plans with the chain DP `solvers.ChainCosts` (per-block options, typed in `options`, plus
one-level segments), applies the plan through torch.utils.checkpoint and selective-checkpoint policies,
and returns a `Plan` with predicted and measured peak and time.

The other algorithms in `solvers` (Rotor's chain DP, Revolve, Gruslys et al.'s BPTT, the Checkmate ILP,
Kusumoto et al.'s lower-set DP, and a simulator that checks any schedule) are reference algorithms,
tested against brute force and against each other; they do not drive `rematerialize`.
"""

from tightfit._lazy import lazy_getattr
from tightfit.remat import solvers  # pure numpy/scipy: cheap to import

_NAMES = {
    "rematerialize": "auto",
    "InfeasibleBudget": "auto",
    "Plan": "plan",
    "Planner": "auto",
    "RematConfig": "config",
    "estimate_plan": "estimate",
    "estimate_planner": "estimate",
    "apply": "execute",
    "undo": "execute",
}
__all__ = [*_NAMES, "solvers"]
__getattr__ = lazy_getattr(__name__, _NAMES)
