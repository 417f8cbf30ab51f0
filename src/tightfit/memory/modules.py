"""Which module is running right now, forward or backward, named as in ``model.named_modules()``.

A thin layer over torch's ``ModTracker`` (module hooks for the forward, multi-grad hooks for the
backward) whose only addition is naming: modules of the given root get their ``named_modules()`` path
("" for the root); modules outside it are named by their class.
"""

from __future__ import annotations

import torch
from torch.distributed._tools.mod_tracker import ModTracker

_GLOBAL = "Global"


class ModuleScope:
    """Context manager tracking the active modules; `innermost()` names the deepest one (or None)."""

    def __init__(self, root: torch.nn.Module | None = None) -> None:
        self._tracker = ModTracker()
        if root is not None:
            # NOTE [ ModTracker naming ]: ModTracker names a module the first time it sees it, by walking
            # children from the first-seen ancestor with the root's *class* name as prefix. Seeding its
            # name table with named_modules() paths (and marking them seen) makes it use ours instead.
            for path, module in root.named_modules(remove_duplicate=False):
                if module not in self._tracker._known_modules:
                    self._tracker._known_modules[module] = path
                self._tracker._seen_modules.add(module)

    def __enter__(self) -> ModuleScope:
        self._tracker.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._tracker.__exit__(*exc)

    @property
    def active(self) -> list[str]:
        """Paths of the modules currently running (forward, or backward when in the backward pass)."""
        return [p for p in self._tracker.parents if p != _GLOBAL]

    def innermost(self) -> str | None:
        """The deepest active module's path, or None outside every module."""
        active = self.active
        if not active:
            return None
        return max(active, key=lambda p: (p.count(".") + (p != ""), p))

    @property
    def in_backward(self) -> bool:
        return self._tracker.is_bw
