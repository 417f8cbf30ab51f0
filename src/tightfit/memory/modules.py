"""Which module is running right now, forward or backward, named as in ``model.named_modules()``.

NOTE [ Passive module tracking ]
  A ruler must not change what it measures. torch's ModTracker and FlopCounterMode's ModuleTracker hang
  autograd hooks on module inputs and outputs, which keeps some tensors alive longer (a few hundred bytes
  on an LSTM, megabytes on checkpointed blocks). This tracker adds no autograd hook:
  1. Forward: global forward pre/post hooks keep a stack of running modules.
  2. Backward: when a module's forward returns, the autograd nodes it created (walked back from its
     outputs to the nodes of its inputs) get its path in ``node.metadata``; inner modules return first,
     so each node carries its innermost module. In the backward, the engine's current node names it.
  3. Recomputation inside the backward (checkpointing) runs forwards again; rule 1 then names them.
  Modules outside ``root`` (a loss module, say) are named by their class.
"""

from __future__ import annotations

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._pytree import tree_leaves

_KEY = "tightfit.module"


def _ancestors(path: str) -> list[str]:
    """'a.b.c' -> ['', 'a', 'a.b', 'a.b.c']; a class name (outside the root) stands alone."""
    if path == "":
        return [""]
    parts = path.split(".")
    return [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]


def _grad_fns(obj: object) -> list:
    return [t.grad_fn for t in tree_leaves(obj) if isinstance(t, torch.Tensor) and t.grad_fn is not None]


class ModuleScope:
    """Context manager tracking the running module; `innermost()` names the deepest one (or None)."""

    def __init__(self, root: torch.nn.Module | None = None) -> None:
        self._names: dict[torch.nn.Module, str] = {}
        if root is not None:
            for path, module in root.named_modules(remove_duplicate=False):
                self._names.setdefault(module, path)
        self._stack: list[tuple[str, set]] = []
        self._handles: list = []

    def _name(self, module: torch.nn.Module) -> str:
        return self._names.get(module, type(module).__name__)

    def _pre(self, module: torch.nn.Module, args: tuple) -> None:
        self._stack.append((self._name(module), set(_grad_fns(args))))

    def _post(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        if not self._stack:
            return
        path, boundary = self._stack.pop()
        if not torch.is_grad_enabled():
            return
        pending = _grad_fns(output)
        while pending:
            node = pending.pop()
            if node is None or node in boundary or _KEY in node.metadata:
                continue
            node.metadata[_KEY] = path
            pending.extend(next_node for next_node, _ in node.next_functions)

    def __enter__(self) -> ModuleScope:
        self._handles = [
            register_module_forward_pre_hook(self._pre),
            register_module_forward_hook(self._post, always_call=True),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stack.clear()

    @property
    def in_backward(self) -> bool:
        return torch._C._current_graph_task_id() != -1

    def innermost(self) -> str | None:
        """The deepest running module's path, or None outside every module."""
        if self._stack:
            return self._stack[-1][0]
        if self.in_backward:
            node = torch._C._current_autograd_node()
            if node is not None:
                return node.metadata.get(_KEY)
        return None

    @property
    def active(self) -> list[str]:
        """Paths of the running modules, outermost first (forward, or backward when in the backward)."""
        if self._stack:
            return [path for path, _ in self._stack]
        innermost = self.innermost()
        if innermost is None:
            return []
        return _ancestors(innermost) if innermost in self._names.values() else [innermost]
