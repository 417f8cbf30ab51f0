"""One-line entries into the training loops users already run.

- any loop: ``tightfit.integrations.attach(model, budget, ...)`` plans on the first training forward and
  on every larger batch shape (``hook``, ``shapes``);
- Hugging Face ``Trainer``: ``tightfit.integrations.hf.TightfitCallback(budget=...)`` (needs transformers);
- Lightning: ``tightfit.integrations.lightning.TightfitCallback(budget=...)`` (needs pytorch_lightning).

The framework modules import their framework when imported, never at ``import tightfit``.
"""

from tightfit._lazy import lazy_getattr

_NAMES = {
    "attach": "hook",
    "BudgetHook": "hook",
    "StepMeter": "hook",
    "ShapePlans": "shapes",
    "make_plan": "shapes",
    "shape_key": "shapes",
}
__all__ = [*_NAMES, "hf", "lightning", "hook", "shapes"]
__getattr__ = lazy_getattr(__name__, _NAMES, submodules=("hf", "lightning", "hook", "shapes"))
