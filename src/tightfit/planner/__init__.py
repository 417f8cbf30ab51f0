"""The one-budget planner across recompute, offload, few-bit and sketch: ``tightfit.plan``.

    plan = tightfit.plan(model, batch, "2GiB", allow=("recompute", "fewbit"))
    model = plan.apply_(model)   # then train as usual
    print(plan)

``plan`` (the verb, ``tightfit.plan``) measures the model once (``Planner``), solves the chain DP over
per-block options that combine techniques, applies and measures the chosen plan and re-solves when it
misses; the ``Plan`` it returns holds per-block decisions with the techniques each uses. The package is
named ``planner`` so that no module shadows the verb.
"""

from tightfit._lazy import lazy_getattr

_NAMES = {
    "plan": "core",
    "Planner": "core",
    "InfeasibleBudget": "core",
    "TECHNIQUES": "core",
    "DEFAULT_ALLOW": "core",
    "LOSSY": "core",
    "DEFAULT_MIN_GRAD_SQNR": "core",
    "Plan": "result",
    "PlanDecision": "result",
    "render": "result",
    "Variant": "variants",
    "Combined": "variants",
}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)
