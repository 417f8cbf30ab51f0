"""Find a model's chain of blocks from its module structure and the order its modules run in.

One forward pass is recorded with forward hooks on every submodule. Blocks are then:
  1. the calls of the children of the shallowest ``nn.ModuleList`` / ``nn.Sequential`` containers whose
     children are themselves composite modules and run at least two calls (GPT-2 ``transformer.h``, BERT
     ``encoder.layer``, Llama ``model.layers``, ResNet stages, U-Net ``downs``/``ups``), or of a module
     that is called several times in one forward (an RNN cell stepped over time: one block per step);
     a Sequential of leaf layers (conv, norm, relu) is one block, never split into single layers;
  2. a block that is itself a container of composite modules is replaced by its children's calls
     (a Sequential of stages becomes its residual blocks);
  3. families nested inside a call of another family are ignored (the outer, larger blocks win);
  4. the root's other direct children (a stem, a head) are blocks too.
If no family exists, the root's direct child calls are the blocks.

Non-chains: ``Blocks.skips`` lists (i, j) where block j reads block i's output with i < j - 1 (U-Net skip
connections, a stacked RNN's per-layer state), ``Blocks.skip_tensors`` their storages and bytes. Per-block
decisions stay correct there (each block is checkpointed on its own), and the skip tensors, alive from
block i to block j whatever the plan, are part of the measured constant of the memory model; a segment
that holds one longer (its reader is inside, its producer before it) counts it in its entry
(``tightfit.remat.reads`` records those reads, glue code's included).
Work outside the blocks (embeddings, the loss, glue code in the parent's forward) is not planned: its
memory is a measured constant.

Calls with the same *signature* (module class and configuration, parameter shapes, argument shapes and
dtypes, the autocast state the call ran under) form a group and are measured once.

NOTE [ Autocast inside the model ]
  Autocast entered inside the model's forward (a wrapper module, accelerate's mixed-precision forward) is
  not active when a block runs on its own. Each call records the autocast state it ran under
  (``autocast_state``: the device types with autocast on, their dtypes, the cast cache), and a group's
  block is measured inside that state again (``autocast_as``), so it runs the ops it runs in the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tightfit._step import LossFn, call_model
from tightfit._tree import StorageKey, leaves, storage_key

_CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential)
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")

# ((device type, dtype) per device type with autocast on, cast cache on); () when autocast is off
AutocastState = tuple


def autocast_state() -> AutocastState:
    """The autocast state of the calling code (see NOTE [ Autocast inside the model ])."""
    on = []
    for device in _AUTOCAST_DEVICES:
        try:
            if torch.is_autocast_enabled(device):
                on.append((device, torch.get_autocast_dtype(device)))
        except (RuntimeError, ValueError):  # a device type this torch does not know
            continue
    return (tuple(on), torch.is_autocast_cache_enabled()) if on else ()


@contextlib.contextmanager
def autocast_as(state: AutocastState) -> Iterator[None]:
    """Run inside the autocast ``state`` recorded by ``autocast_state`` (and with autocast off on every
    other device type that has it on here)."""
    with contextlib.ExitStack() as stack:
        on, cache = state if state else ((), True)
        wanted = dict(on)
        current = autocast_state()
        for device, _ in current[0] if current else ():
            if device not in wanted:
                stack.enter_context(torch.autocast(device, enabled=False))
        for device, dtype in on:
            stack.enter_context(torch.autocast(device, dtype=dtype, cache_enabled=cache))
        yield


@dataclass
class Call:
    """One module call recorded in the probe forward."""

    path: str
    module: torch.nn.Module = field(repr=False)
    index: int  # how many earlier calls of the same module in this forward
    start: int
    end: int = -1
    parent: int = -1  # position of the enclosing call in the record, -1 for top level
    signature: tuple = field(default=(), repr=False)
    # storages of tensor arguments and of tensor outputs: bytes
    inputs: dict[StorageKey, int] = field(default_factory=dict, repr=False)
    outputs: dict[StorageKey, int] = field(default_factory=dict, repr=False)


@dataclass
class Block:
    """A planned unit: the ``call``-th call of submodule ``path``; ``group`` indexes identical blocks."""

    path: str
    call: int
    group: int
    name: str = ""  # path, with "[call]" when the module runs several times


@dataclass
class Group:
    """Identical blocks (same signature): measured once, on the arguments of the first call."""

    path: str
    module: torch.nn.Module = field(repr=False)
    args: tuple = field(repr=False)
    kwargs: dict = field(repr=False)
    flags: tuple[bool, ...] = ()  # requires_grad of each tensor argument in the real step
    members: list[int] = field(default_factory=list)  # block positions
    autocast: AutocastState = ()  # the autocast state its calls ran under (NOTE [ Autocast inside ... ])


@dataclass
class Blocks:
    """The blocks of a model in execution order, their groups, and how they were found."""

    blocks: list[Block]
    groups: list[Group]
    source: str  # which rule found them, for the plan printout
    skip_tensors: dict[tuple[int, int], dict[StorageKey, int]] = field(
        default_factory=dict
    )  # (i, j), i < j-1: the storages block j reads from block i's output, with their bytes

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def skips(self) -> list[tuple[int, int]]:
        """(i, j): block j reads block i's output, i < j-1; ordered by j, then i."""
        return sorted(self.skip_tensors, key=lambda ij: (ij[1], ij[0]))


def _describe(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, x.requires_grad, x.device.type)
    if isinstance(x, (tuple, list)):
        return (type(x).__name__, tuple(_describe(v) for v in x))
    if isinstance(x, Mapping):
        return ("map", tuple((k, _describe(v)) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))))
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return type(x).__qualname__


def _module_key(module: torch.nn.Module, cache: dict[int, tuple]) -> tuple:
    key = cache.get(id(module))
    if key is None:
        params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in module.named_parameters())
        buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in module.named_buffers())
        key = (type(module).__qualname__, repr(module), params, buffers)
        cache[id(module)] = key
    return key


def _detach(x: Any) -> Any:
    """The arguments with every tensor detached (same storage: nothing is copied)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, list):
        return [_detach(v) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


def record_calls(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    run: Callable[[], Any] | None = None,
) -> tuple[list[Call], dict[tuple, tuple[tuple, dict, tuple[bool, ...]]]]:
    """Run one forward with hooks (or ``run()``, which makes one, e.g. a whole training step); return the
    calls in order and, per signature, the first call's arguments (detached) with the requires_grad flag
    of each tensor argument."""
    del loss_fn  # the forward alone fixes the structure
    calls: list[Call] = []
    stack: list[int] = []
    counts: dict[int, int] = {}
    keys: dict[int, tuple] = {}
    first_args: dict[tuple, tuple[tuple, dict, tuple[bool, ...]]] = {}
    tick = [0]
    paths = {id(m): p for p, m in model.named_modules()}

    # a module called inside the backward (a checkpoint recomputing it, possibly stopped early before its
    # forward hook) is not a call of the forward
    graph_task = getattr(torch._C, "_current_graph_task_id", lambda: -1)

    def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if graph_task() != -1:
            return
        index = counts.get(id(module), 0)
        counts[id(module)] = index + 1
        signature = (
            _module_key(module, keys),
            module.training,
            _describe(args),
            _describe(kwargs),
            autocast_state(),
        )
        tick[0] += 1
        calls.append(
            Call(
                paths[id(module)],
                module,
                index,
                tick[0],
                parent=stack[-1] if stack else -1,
                signature=signature,
                inputs=storage_bytes((args, kwargs)),
            )
        )
        stack.append(len(calls) - 1)
        for value in (*args, *kwargs.values()):
            if type(value).__name__.endswith("Cache") and hasattr(value, "update"):
                raise ValueError(
                    f"{paths[id(module)]} receives a {type(value).__name__}: recomputing it would update the "
                    "cache twice; train with use_cache=False (in the batch or the model config)"
                )
        if signature not in first_args:
            flags = tuple(t.requires_grad for t in leaves((args, kwargs)))
            first_args[signature] = (_detach(args), _detach(dict(kwargs)), flags)

    def post(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if graph_task() != -1:
            return
        tick[0] += 1
        if stack:
            call = calls[stack.pop()]
            call.end = tick[0]
            call.outputs = storage_bytes(output)

    handles = []
    for _, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
    try:
        if run is not None:
            run()
        else:
            with torch.enable_grad():
                out = call_model(model, batch)
            del out
    finally:
        for h in handles:
            h.remove()
    return calls, first_args


def storage_bytes(x: Any) -> dict[StorageKey, int]:
    """The storages behind the tensors in ``x`` (to see which block feeds which), with their bytes."""
    out = {}
    for t in leaves(x):
        key = storage_key(t)
        if key is not None:
            out[key] = t.untyped_storage().nbytes()
    return out


def _depth(path: str) -> int:
    return 0 if path == "" else path.count(".") + 1


def _leaf(module: torch.nn.Module) -> bool:
    return next(iter(module.children()), None) is None


def _families(calls: list[Call], model: torch.nn.Module) -> list[tuple[str, list[int]]]:
    """(description, call positions) of the candidate families: the calls of the children of a container
    whose children all have submodules themselves (a Sequential of layers is not a family), and the calls
    of a module called at least twice in one forward (an RNN cell stepped over time)."""
    modules = dict(model.named_modules())
    families: list[tuple[str, list[int]]] = []
    for path, module in modules.items():
        if isinstance(module, _CONTAINERS) and not any(_leaf(m) for m in module.children()):
            prefix = f"{path}." if path else ""
            kids = {f"{prefix}{name}" for name, _ in module.named_children()}
            members = [i for i, c in enumerate(calls) if c.path in kids]
            if len(members) >= 2:
                families.append((path or "children of the root module", members))
    by_module: dict[str, list[int]] = {}
    for i, c in enumerate(calls):
        by_module.setdefault(c.path, []).append(i)
    for path, members in by_module.items():
        if len(members) >= 2 and path != "":
            families.append((f"{path} (called {len(members)}x)", members))
    return families


def _inside(calls: list[Call], i: int, j: int) -> bool:
    """Whether call i runs inside call j."""
    return calls[j].start < calls[i].start and calls[i].end <= calls[j].end


def _expand(calls: list[Call], i: int, children: dict[int, list[int]]) -> list[int]:
    """A container call whose children all have submodules is replaced by its children's calls."""
    module = calls[i].module
    kids = children.get(i, [])
    if isinstance(module, _CONTAINERS) and kids and not any(_leaf(calls[k].module) for k in kids):
        return [k for c in kids for k in _expand(calls, c, children)]
    return [i]


def select_blocks(calls: list[Call], model: torch.nn.Module) -> tuple[list[int], str]:
    """Positions (in ``calls``) of the block calls, in execution order, and the rule that found them."""
    children: dict[int, list[int]] = {}
    for i, c in enumerate(calls):
        children.setdefault(c.parent, []).append(i)
    top = children.get(-1, [])
    root_kids = children.get(top[0], []) if len(top) == 1 else top
    families = _families(calls, model)
    # shallowest families first; a family whose calls all run inside an already chosen call is skipped
    families.sort(key=lambda f: (min(_depth(calls[i].path) for i in f[1]), -len(f[1])))
    chosen: list[int] = []
    names: list[str] = []
    for name, members in families:
        members = [m for m in members if not any(_inside(calls, m, c) for c in chosen)]
        if len(members) < 2 or any(_inside(calls, c, m) for m in members for c in chosen):
            continue
        chosen.extend(members)
        names.append(name)
    if chosen:
        # the root's other children (stem, head, ...) are blocks too when they hold no chosen call
        extra = [
            k
            for k in root_kids
            if k not in chosen and not any(_inside(calls, c, k) or _inside(calls, k, c) for c in chosen)
        ]
        chosen.extend(extra)
        if extra:
            names.append("other children of the root")
    else:
        if len(root_kids) < 2:
            raise ValueError(
                "no chain of blocks found: the model has no nn.ModuleList/nn.Sequential of at least two "
                "called submodules, no submodule called twice and fewer than two top-level submodules; "
                "wrap the repeated part of the model in an nn.ModuleList"
            )
        chosen, names = list(root_kids), ["children of the root module"]
    blocks = sorted({k for c in chosen for k in _expand(calls, c, children)}, key=lambda i: calls[i].start)
    return blocks, ", ".join(names)


def find_blocks(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    *,
    include: Callable[[str], bool] | None = None,
    run: Callable[[], Any] | None = None,
) -> Blocks:
    """Record one forward of ``model`` on ``batch`` and return its blocks grouped by signature.

    ``include(path)`` can restrict the blocks to some module paths; ``run()``, when given, makes the
    forward instead (the planner records the blocks during its timed training step).
    """
    calls, first_args = record_calls(model, batch, loss_fn, run)
    positions, source = select_blocks(calls, model)
    if include is not None:
        positions = [i for i in positions if include(calls[i].path)]
    counts: dict[str, int] = {}
    for i in positions:
        counts[calls[i].path] = counts.get(calls[i].path, 0) + 1
    groups: list[Group] = []
    group_of: dict[tuple, int] = {}
    blocks: list[Block] = []
    for i in positions:
        c = calls[i]
        g = group_of.get(c.signature)
        if g is None:
            args, kwargs, flags = first_args[c.signature]
            g = group_of[c.signature] = len(groups)
            groups.append(Group(c.path, c.module, args, kwargs, flags, autocast=c.signature[-1]))
        groups[g].members.append(len(blocks))
        name = c.path if counts[c.path] == 1 else f"{c.path}[{c.index}]"
        blocks.append(Block(c.path, c.index, g, name))
    record = [calls[i] for i in positions]
    producer: dict[StorageKey, int] = {}  # storage -> the last block that output it
    skip_tensors: dict[tuple[int, int], dict[StorageKey, int]] = {}
    for j, call in enumerate(record):
        for key, nbytes in call.inputs.items():
            i = producer.get(key, j)
            if i < j - 1:
                skip_tensors.setdefault((i, j), {})[key] = nbytes
        for key in call.outputs:
            producer[key] = j
    return Blocks(blocks, groups, source, skip_tensors)
