"""Carry out a remat plan with PyTorch's own machinery: each chosen block call runs through
``torch.utils.checkpoint(use_reentrant=False)``, optionally with a selective-checkpoint policy that keeps
some op outputs (matmuls, attention) and recomputes the rest. No custom executor.

NOTE [ How a plan is applied ]
  The instance's ``forward`` of every planned block module is replaced by a small dispatcher (an
  instance attribute, so parameters, buffers and ``state_dict`` keys do not change). The dispatcher looks
  up the decision for this call (a module called several times per step, like an RNN cell in a loop, has
  one decision per call index; the count restarts at every forward of the root model) and runs the
  original forward plainly or under checkpoint. ``undo(model)`` restores the previous ``forward``.
  Checkpointing only happens when autograd records (grad enabled) and the block is in training mode, so
  ``model.eval()`` and ``torch.no_grad()`` run the original code. A ``segment:<n>`` decision opens one
  checkpoint region over this call and the next n - 1 planned block calls (``tightfit.remat.segments``);
  a forward hook on the root closes a region the forward left open.
  The root's forward hooks also pause Python's garbage collector during a training forward
  (``tightfit.remat.collector``). A plan made for ``torch.compile`` may also carry a compiler budget: the
  root's forward then runs under ``torch.autograd.graph.region_activation_memory_budget`` while it is
  traced, so the compiler's own knapsack recomputes cheap ops of this model only (not of every compiled
  model in the process, as the global ``activation_memory_budget`` would).

NOTE [ Why gradients are bit-identical ]
  Non-reentrant checkpoint stashes and restores the RNG state (CPU and the inputs' accelerators) and the
  autocast state before recomputing, so dropout masks and autocast dtypes are the same in the recompute;
  recomputed ops are the same kernels on the same inputs. Running statistics of batch norms inside a
  recomputed block would be updated twice: the recompute restores them afterwards (``_frozen_stats``).
  A block whose forward has other side effects (appending to a KV cache, printing, counters) would
  repeat them in the recompute: pass ``use_cache=False`` to Hugging Face models when training.

NOTE [ Keep-ops on another op sequence ]
  A ``keep-ops`` option names op positions in the sequence its block ran when measured; its positions
  form whole units (an in-place chain such as dropout's ``bernoulli_`` then ``div_`` is kept or
  recomputed together, random ops all together), which is what makes selective checkpointing exact.
  A later call can run other ops (transformers skips an attention mask that is all ones; another
  autocast state), and the same positions would then split units: a recompute writing again into a
  cached tensor, or a recomputed random op drawing from an RNG state a kept one did not advance, gives
  wrong gradients. So such a call is detected (at its first other op once the measured op names are
  known: from measuring in this process, or from the first call that ran the measured sequence; else
  by its op count and digest when it ends), its partial work dropped, the RNGs and running statistics
  put back, and the call run again under ``recompute``, with an ``OpSequenceWarning`` once per block
  type, option and sequence: exact gradients, more time and fewer bytes kept than planned. What else the
  partial forward did happens twice: Python side effects in the block's code, its submodules' forward
  hooks, in-place updates of buffers other than running statistics. A partial forward that ran
  collectives through the dispatcher (c10d and functional collectives: an FSDP unit inside the block,
  SyncBatchNorm; DTensor's implicit redistributions may not be seen) is not run again, which would repeat
  them on this rank alone: the call raises ``OpSequenceError``. So does a keep-ops block nested in a
  segment's member (the segment's replay could not hold the second run). Planners measure under
  ``strict_op_sequences``, where every such call raises ``OpSequenceError`` and the option is refused.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import inspect
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from tightfit._rng import rng_devices
from tightfit._tree import leaves
from tightfit.remat import collector
from tightfit.remat.options import (
    RECOMPUTE,
    SAVE_LINEAR_KEY,
    SAVE_MATMUL,
    SAVE_MATMUL_KEY,
    STORE,
    InSegment,
    KeepOps,
    Option,
    Recompute,
    SavePolicy,
    Segment,
    Store,
    parse_option,
)
from tightfit.remat.segments import Segments

aten = torch.ops.aten


def _ops(*names: str) -> frozenset[Any]:
    """Overload packets that exist in this torch build (attention kernels differ between versions)."""
    found = []
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None:
            found.append(packet)
    return frozenset(found)


_LINEAR_OPS = _ops("mm", "addmm", "convolution", "_convolution", "mkldnn_convolution", "_addmm_activation")
_ATTENTION_OPS = _ops(
    "bmm",
    "baddbmm",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_efficient_attention_forward",
    "_flash_attention_forward",
)
# save policy name -> op overload packets whose outputs are kept; everything else in the block is recomputed
SAC_SAVED_OPS: dict[str, frozenset[Any]] = {
    SAVE_MATMUL_KEY: _LINEAR_OPS | _ATTENTION_OPS,
    SAVE_LINEAR_KEY: _LINEAR_OPS,
}


def op_digest(ops: Iterable[Any]) -> str:
    """A short digest of an op sequence (the ops' names in order)."""
    return hashlib.sha1("\n".join(str(op) for op in ops).encode()).hexdigest()[:12]


def keep_ops_option(indices: Iterable[int], ops: Sequence[Any]) -> KeepOps:
    """The option keeping the outputs of the ops at ``indices`` of a block whose op sequence is ``ops``
    (measured by ``tightfit.remat.measure.op_options``); remembers the sequence's ops, so that a call
    running other ops stops at its first other op (NOTE [ Keep-ops on another op sequence ])."""
    count, digest = _register_sequence(ops)
    return KeepOps(frozenset(indices), count, digest)


def keeps_output(saved: frozenset[Any], op: Any) -> bool:
    """Whether a named option whose kept ops are ``saved`` (``SAC_SAVED_OPS``) keeps ``op``'s output."""
    return getattr(op, "overloadpacket", op) in saved


def _policy(saved: frozenset[Any]) -> Callable[..., CheckpointPolicy]:
    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if keeps_output(saved, op) else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def sac_contexts(policy: Callable[..., CheckpointPolicy]) -> Any:
    """Selective-checkpoint contexts for ``policy``. Cached outputs may be mutated in place later in the
    forward (dropout fills and scales its noise in place): kept ops are whole in-place chains, and every
    option's gradients are checked against plain autograd before a plan may use it."""
    try:
        return create_selective_checkpoint_contexts(policy, allow_cache_entry_mutation=True)
    except TypeError:  # torch < 2.5: no such argument (a mutated cache entry then raises, option inexact)
        return create_selective_checkpoint_contexts(policy)


class OpSequenceError(RuntimeError):
    """A block call ran other ops than its ``keep-ops`` option was measured with, while a planner was
    measuring (``strict_op_sequences``): the option's measured costs do not describe that call.
    ``option``: that ``KeepOps`` option (a planner verifying a plan stops offering it)."""

    def __init__(self, message: str, option: KeepOps) -> None:
        super().__init__(message)
        self.option = option


class OpSequenceWarning(UserWarning):
    """A block call ran other ops than its ``keep-ops`` option was measured with, and ran again under
    ``recompute`` (NOTE [ Keep-ops on another op sequence ]): same gradients, not the planned costs."""


_STRICT: contextvars.ContextVar[bool] = contextvars.ContextVar("tightfit_strict_op_sequences", default=False)
# (op count, digest) -> the measured ops, from measurement or from a call that ran that sequence
_SEQUENCES: dict[tuple[int, str], tuple[Any, ...]] = {}
_WARNED: set[tuple[str, str, int, str]] = set()  # (block type, option, ops run, their digest) warned of


@contextlib.contextmanager
def strict_op_sequences() -> Iterator[None]:
    """Inside, a keep-ops call running other ops than measured raises ``OpSequenceError`` (planners
    measure under it: a measured cost must describe the call it is used for)."""
    token = _STRICT.set(True)
    try:
        yield
    finally:
        _STRICT.reset(token)


def _register_sequence(ops: Sequence[Any], key: tuple[int, str] | None = None) -> tuple[int, str]:
    key = key or (len(ops), op_digest(ops))
    if key not in _SEQUENCES:
        _SEQUENCES[key] = tuple(ops)
    return key


class _Diverged(BaseException):
    """Raised by a keep-ops policy at the first op off the measured sequence, caught by ``_run_keep_ops``
    (a BaseException: a block's own ``except Exception`` fallback must not swallow it)."""


_COLLECTIVE_NAMESPACES = frozenset({"c10d", "_c10d_functional", "c10d_functional", "_dtensor"})


def _collective(op: Any) -> bool:
    return getattr(op, "namespace", None) in _COLLECTIVE_NAMESPACES


class _IndexedPolicy:
    """The policy of one ``keep-ops`` call: keeps the outputs of the ops at the kept positions, and
    records the ops it sees so that ``matched`` can tell whether the block ran the measured sequence
    (NOTE [ Keep-ops on another op sequence ]); stops at the first other op when the measured names are
    known."""

    def __init__(self, kept: KeepOps) -> None:
        self.kept = kept
        self.ops: list[Any] = []
        self.names = _SEQUENCES.get((kept.count, kept.digest))  # the measured ops, when known

    def __call__(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if getattr(ctx, "is_recompute", False):  # torch < 2.6 asks again while recomputing
            return CheckpointPolicy.PREFER_RECOMPUTE
        index = len(self.ops)
        self.ops.append(op)
        if self.names is not None and (index >= len(self.names) or op is not self.names[index]):
            raise _Diverged
        return CheckpointPolicy.MUST_SAVE if index in self.kept.indices else CheckpointPolicy.PREFER_RECOMPUTE

    def matched(self) -> bool:
        """Whether the call ran the measured sequence (then its ops are remembered)."""
        if self.names is not None:  # every op was compared on the way
            return len(self.ops) == len(self.names)
        if len(self.ops) == self.kept.count and op_digest(self.ops) == self.kept.digest:
            _register_sequence(self.ops, (self.kept.count, self.kept.digest))
            return True
        return False


def _rng_restorer(tensors: Iterable[torch.Tensor]) -> Callable[[], None]:
    """A function putting back the CPU generator and those of the devices of ``tensors`` as they are now."""
    cpu = torch.get_rng_state()
    devices = [
        (module, i, module.get_rng_state(i))
        for kind, indices in rng_devices(tensors).items()
        for module in [torch.get_device_module(kind)]
        for i in indices
    ]

    def restore() -> None:
        torch.set_rng_state(cpu)
        for module, i, state in devices:
            module.set_rng_state(state, i)

    return restore


def _run_keep_ops(
    module: torch.nn.Module,
    forward: Callable[..., Any],
    option: KeepOps,
    args: tuple,
    kwargs: Mapping[str, Any],
    norms: list[torch.nn.Module],
    *,
    rerun: bool = True,
) -> Any:
    """One call under a keep-ops option; a call off the measured op sequence runs again under
    ``recompute`` (NOTE [ Keep-ops on another op sequence ]), or raises when not ``rerun``."""
    stats = _stat_buffers(norms)
    saved_stats: list[torch.Tensor] = []
    if stats:
        with _disable_current_modes():
            saved_stats = [b.detach().clone() for b in stats]
    restore_rng = _rng_restorer(leaves((args, dict(kwargs))))
    policy = _IndexedPolicy(option)
    contexts = functools.partial(sac_contexts, policy)
    try:
        out = checkpoint(
            recomputable(norms, forward), *args, use_reentrant=False, context_fn=contexts, **kwargs
        )
        if policy.matched():
            return out
        del out
    except _Diverged:
        pass
    ran = f"{len(policy.ops)} ops" if policy.names is None else f"other ops (first at op {len(policy.ops)})"
    message = f"{type(module).__name__} ran {ran} where its keep-ops option was measured with {option.count}"
    if _STRICT.get():
        raise OpSequenceError(f"{message}: the measured costs do not describe this call", option)
    if not rerun:
        raise OpSequenceError(
            f"{message}, inside a checkpointed segment, whose replay cannot run it again. Plan with a batch "
            "that takes this path, or with RematConfig(op_level=False).",
            option,
        )
    if any(_collective(op) for op in policy.ops):
        raise OpSequenceError(
            f"{message}, and ran collectives before that: running the call again would repeat them on this "
            "rank alone. Plan with a batch that takes this path, or with RematConfig(op_level=False).",
            option,
        )
    restore_rng()
    if stats:
        with torch.no_grad(), _disable_current_modes():
            for b, s in zip(stats, saved_stats):
                b.copy_(s)
    key = (type(module).__qualname__, option.key, len(policy.ops), op_digest(policy.ops))
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"{message}: this call runs under recompute instead (same gradients; more time, fewer bytes "
            "kept than planned). Plan with a batch that takes this path for a plan made for it.",
            OpSequenceWarning,
            stacklevel=4,
        )
    return checkpoint(recomputable(norms, forward), *args, use_reentrant=False, **kwargs)


def _context_fn(option: SavePolicy) -> Callable[[], Any]:
    """The selective-checkpoint contexts of a named save policy."""
    return functools.partial(create_selective_checkpoint_contexts, _policy(SAC_SAVED_OPS[option.name]))


# -- running one call under an option --------------------------------------------------------------
def norm_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules with running statistics (batch norm and friends), found once per patched module
    rather than by a scan of its module tree on every call (an RNN cell is called thousands of times)."""
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]


def _stat_buffers(norms: list[torch.nn.Module]) -> list[torch.Tensor]:
    """Running statistics a training-mode forward of ``norms`` updates in place."""
    out: list[torch.Tensor] = []
    for m in norms:
        if m.track_running_stats and m.training:
            out.extend(b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None)
    return out


@contextlib.contextmanager
def _frozen_stats(buffers: list[torch.Tensor]) -> Iterator[None]:
    """Undo in-place updates of running statistics made while recomputing. The copies are made outside
    the dispatch modes: a selective-checkpoint recompute only accepts the ops of the first pass (the
    ruler does not see these few-kilobyte copies either)."""
    with _disable_current_modes():
        saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad(), _disable_current_modes():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def recomputable(norms: list[torch.nn.Module], forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` (of a module whose ``norm_layers`` are ``norms``) for a call that may be recomputed:
    the first call runs it plainly, later ones (the recomputation) restore the running statistics it
    updates in place."""
    stats = _stat_buffers(norms)
    calls = [0]

    def body(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1 or not stats:
            return forward(*a, **k)
        with _frozen_stats(stats):  # a recompute: leave running stats as the first pass left them
            return forward(*a, **k)

    return body


def run_call(
    module: torch.nn.Module,
    forward: Callable[..., Any],
    option: Store | SavePolicy | KeepOps | Recompute,
    args: tuple,
    kwargs: Mapping[str, Any],
    norms: list[torch.nn.Module],
    *,
    rerun: bool = True,
) -> Any:
    """Run ``forward(*args, **kwargs)`` (the block's original forward, ``norms`` its ``norm_layers``)
    under a single-call remat option (``rerun``: whether a keep-ops call off its measured ops may run
    again under recompute, else it raises)."""
    if isinstance(option, Store) or not (torch.is_grad_enabled() and module.training):
        return forward(*args, **kwargs)
    body = recomputable(norms, forward)
    if isinstance(option, KeepOps) and torch.compiler.is_compiling():
        # a compiled trace sees other ops than eager (functionalized, decomposed): the measured op
        # positions do not apply there; keep matmuls, convolutions and attention instead
        option = SAVE_MATMUL
    match option:
        case KeepOps():
            return _run_keep_ops(module, forward, option, args, kwargs, norms, rerun=rerun)
        case SavePolicy():
            return checkpoint(body, *args, use_reentrant=False, context_fn=_context_fn(option), **kwargs)
        case Recompute():
            return checkpoint(body, *args, use_reentrant=False, **kwargs)
    raise TypeError(f"run_call runs single-call options, got {option!r}")


# -- patching the model ------------------------------------------------------------------------------
_ATTR = "_tightfit_remat"  # on the root: the patched paths, the root hooks' handles, its forward's record
_STATE = "_tightfit_remat_state"  # on each patched module: its _Patched


class _Patched:
    """Bookkeeping for one patched module: how to call its original forward, and the decision per call.

    Kept in the module's ``__dict__``, holding no reference to the module itself (only its norm layers,
    which ``copy.deepcopy`` copies along with it), so that a deep copy of a patched model is a patched
    copy that runs its own parameters and updates its own running statistics.
    """

    def __init__(
        self, module: torch.nn.Module, decisions: list[Option], default: Option, segments: Segments
    ) -> None:
        previous = module.__dict__.get("forward")
        self.had_instance_forward = previous is not None
        self.previous = previous
        if previous is None:
            self.func: Callable[..., Any] | None = type(module).forward
        elif isinstance(previous, types.MethodType) and previous.__self__ is module:
            self.func = previous.__func__
        else:  # some other instance-level callable (another library's wrapper): call it as it is
            self.func = None
        self.decisions = decisions
        self.default = default
        self.norms = norm_layers(module)
        self.segments = segments  # shared by every patched module of one model
        # one planned call: the same option for every call (no counting; simpler for torch.compile)
        self.constant = decisions[0] if len(decisions) == 1 else None
        self.calls = 0

    def next_option(self) -> Option:
        if self.constant is not None:
            return self.constant
        index = self.calls
        self.calls = index + 1
        return self.decisions[index] if index < len(self.decisions) else self.default


def _forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The patched forward: the original one, run under this call's option."""
    state: _Patched = self.__dict__[_STATE]
    original = functools.partial(state.func, self) if state.func is not None else state.previous
    option = state.next_option()
    if isinstance(option, (Segment, InSegment)):
        if torch.compiler.is_compiling():  # a trace cannot hold a region spanning calls: this call alone
            return run_call(self, original, RECOMPUTE, args, kwargs, state.norms)
        # a segment records one wrapper per call: none needed in a module without norm layers
        forward = recomputable(state.norms, original) if state.norms else original
        return state.segments.call(self, forward, option, args, kwargs)
    if isinstance(option, KeepOps):
        if state.segments.running:  # nested in a segment's member: a rerun would escape its replay
            return run_call(self, original, option, args, kwargs, state.norms, rerun=False)
        # calls differing from the plan (a skipped layer) can leave a segment open; its replay would not
        # see a keep-ops call run again with the RNG put back (NOTE [ Keep-ops on another op sequence ])
        state.segments.finish()
    return run_call(self, original, option, args, kwargs, state.norms)


def _reset_counts(root: torch.nn.Module, _args: Any) -> None:
    """Forward pre-hook on the root: per-call counting restarts at every forward of the model."""
    for m in root.modules():
        state = m.__dict__.get(_STATE)
        if state is not None:
            state.calls = 0
            state.segments.finish(failed=True)  # left open by a forward that raised


def _close_segments(root: torch.nn.Module, _args: Any, _output: Any) -> None:
    """Forward hook on the root (also called when the forward raises): a segment still open ends here."""
    for m in root.modules():
        state = m.__dict__.get(_STATE)
        if state is not None:
            state.segments.finish()


def reset_step(model: torch.nn.Module, *, failed: bool = False) -> None:
    """Reset the per-forward state of the plan applied to ``model`` by hand, for a loop that runs the
    model's blocks without calling ``model`` itself (Lightning calls ``training_step``, not the planned
    root's forward), so the root's hooks never run: end a segment region still open (``failed``: abandon
    it, as after an exception), restart every block's call counter, and resume the garbage collector if a
    forward of ``model`` paused it. Call it before each step's forward and before its backward. A no-op on
    an unpatched model."""
    for m in model.modules():
        state = m.__dict__.get(_STATE)
        if state is not None:
            state.calls = 0
            state.segments.finish(failed=failed)
    collector.resume_after_forward(model, None, None)


def compile_budget_supported() -> bool:
    """Whether this torch scopes the compiler's activation memory budget to a region (torch >= 2.13)."""
    return hasattr(torch.autograd.graph, "region_activation_memory_budget")


def _budgeted_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The root's forward under a plan's compiler budget: traced under torch.compile inside
    ``region_activation_memory_budget`` (every op of the graph carries it); plain in eager mode."""
    record: _Applied = self.__dict__[_ATTR]
    budget, previous = record.compile_budget, record.previous_forward
    original = previous if previous is not None else functools.partial(type(self).forward, self)
    if not torch.compiler.is_compiling():
        return original(*args, **kwargs)
    with torch.autograd.graph.region_activation_memory_budget(budget):
        return original(*args, **kwargs)


@dataclass
class _Applied:
    """What ``apply`` did to the root: the patched paths, the root hooks, and the compiler budget with the
    root's previous instance ``forward`` (None: the class's)."""

    paths: list[str]
    handles: list[Any]
    compile_budget: float | None
    previous_forward: Callable[..., Any] | None


def apply(
    model: torch.nn.Module,
    decisions: Mapping[str, Sequence[Option | str]],
    *,
    default: Option | str = STORE,
    compile_budget: float | None = None,
) -> torch.nn.Module:
    """Patch ``model`` in place: ``decisions[path][i]`` is the option for the i-th call of the submodule
    at ``path`` within one forward of ``model`` (calls past the end use ``default``). Options are
    ``tightfit.remat.options`` types or their JSON keys. Returns ``model``.

    ``compile_budget`` (in [0, 1]): under ``torch.compile`` the model's forward is traced inside
    ``torch.autograd.graph.region_activation_memory_budget(compile_budget)`` (no effect in eager mode).
    Applying again replaces the previous plan. Raises ``KeyError`` naming a path that is not a submodule
    and ``ValueError`` for an unknown option or a bad compiler budget, before anything is patched.
    """
    if compile_budget is not None:
        if not compile_budget_supported():
            raise ValueError(
                f"compile_budget needs torch.autograd.graph.region_activation_memory_budget (torch >= 2.13); "
                f"this is torch {torch.__version__}: plan again with this torch"
            )
        if isinstance(compile_budget, bool) or not 0.0 <= compile_budget <= 1.0:
            raise ValueError(f"compile_budget must be a number in [0, 1], got {compile_budget!r}")
    modules = dict(model.named_modules())
    missing = [p for p in decisions if p not in modules]
    if missing:
        raise KeyError(f"not submodules of the model: {missing}; valid paths look like {list(modules)[1:4]}")
    parsed = {path: [parse_option(o) for o in options] for path, options in decisions.items()}
    default = parse_option(default)
    if isinstance(default, (Segment, InSegment)):
        raise ValueError(f"a segment option cannot be the default for calls past the plan, got {default}")
    undo(model)
    patched: list[str] = []
    counting = False
    segments = Segments()
    for path, options in parsed.items():
        if all(isinstance(o, Store) for o in options) and isinstance(default, Store):
            continue
        module = modules[path]
        state = _Patched(module, list(options), default, segments)
        module.__dict__[_STATE] = state
        module.forward = _BoundForward(_forward, module)
        patched.append(path)
        counting = counting or state.constant is None or isinstance(state.constant, (Segment, InSegment))
    handles = []
    if patched:
        handles.append(model.register_forward_pre_hook(collector.pause_for_forward))
        handles.append(model.register_forward_hook(collector.resume_after_forward, always_call=True))
    if counting:
        handles.append(model.register_forward_pre_hook(_reset_counts))
        handles.append(model.register_forward_hook(_close_segments, always_call=True))
    record = _Applied(patched, handles, None, None)
    if compile_budget is not None:
        record.compile_budget, record.previous_forward = float(compile_budget), model.__dict__.get("forward")
    model.__dict__[_ATTR] = record
    if compile_budget is not None:
        model.forward = _BoundForward(_budgeted_forward, model)
    return model


class _BoundForward:
    """A patched module's instance ``forward``: ``func(module, ...)``. A small object rather than a bound
    method of ``func``, which pickles as ``getattr(module, func.__name__)`` and cannot be loaded: this one
    pickles (``torch.save(model)``) and deep-copies with the module. ``inspect.signature`` reports the
    forward it replaced (Hugging Face's Trainer reads it to choose the dataset's columns)."""

    def __init__(self, func: Callable[..., Any], module: torch.nn.Module) -> None:
        self.func, self.module = func, module
        self.replaced = module.__dict__.get("forward")  # an instance forward already there, or None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(self.module, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        replaced = self.replaced
        if replaced is None:
            replaced = types.MethodType(type(self.module).forward, self.module)
        return inspect.signature(replaced)


def undo(model: torch.nn.Module) -> torch.nn.Module:
    """Remove a plan applied by :func:`apply` (a no-op on an unpatched model). Returns ``model``."""
    record: _Applied | None = model.__dict__.pop(_ATTR, None)
    if record is None:
        return model
    if record.compile_budget is not None:
        if record.previous_forward is None:
            model.__dict__.pop("forward", None)
        else:
            model.forward = record.previous_forward
    modules = dict(model.named_modules())
    for path in record.paths:
        module = modules[path]
        state = module.__dict__.pop(_STATE)
        if state.had_instance_forward:
            module.forward = state.previous
        else:
            module.__dict__.pop("forward", None)
    for handle in record.handles:
        handle.remove()
    return model


def applied(model: torch.nn.Module) -> dict[str, list[Option]]:
    """The decisions currently applied to ``model`` (path -> option per call), {} when none."""
    record: _Applied | None = model.__dict__.get(_ATTR)
    if record is None:
        return {}
    modules = dict(model.named_modules())
    return {p: list(modules[p].__dict__[_STATE].decisions) for p in record.paths}


def applied_compile_budget(model: torch.nn.Module) -> float | None:
    """The compiler budget of the plan applied to ``model``, None when it has none."""
    record: _Applied | None = model.__dict__.get(_ATTR)
    return None if record is None else record.compile_budget
