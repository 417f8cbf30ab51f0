"""Rematerialization: recompute instead of store, on an optimal schedule under a memory budget.

`solvers` is the pure-algorithms layer (chain DP, Revolve, BPTT, Checkmate ILP, lower-set DP, simulator);
`rematerialize` applies it to unmodified models through torch.utils.checkpoint and selective-checkpoint
policies, and returns a `Plan` with predicted and measured peak and time.
"""

from tightfit._lazy import lazy_getattr
from tightfit.remat import solvers  # pure numpy/scipy: cheap to import

_NAMES = {
    "rematerialize": "auto",
    "InfeasibleBudget": "auto",
    "Plan": "plan",
    "Planner": "auto",
    "estimate_plan": "estimate",
    "apply": "execute",
    "undo": "execute",
}
__all__ = [*_NAMES, "solvers"]
__getattr__ = lazy_getattr(__name__, _NAMES)
