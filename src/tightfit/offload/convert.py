"""`tightfit.convert_(model, Offload())` and `offloading(...)`: offload what a model's blocks save.

Blocks: the ones passed with ``blocks=`` (paths or modules), else the children of the model's largest
``nn.ModuleList`` / ``nn.Sequential`` whose children all have submodules (GPT-2 ``transformer.h``, Llama
``model.layers``, BERT ``encoder.layer``); largest by parameter count, shallowest on a tie. The rule is
static (no forward pass), so it is simpler than remat's block finder, which records a forward.

A converted block is a shallow copy of the original whose class is a subclass of the original's
(``OffloadedGPT2Block`` is a ``GPT2Block``) with ``__call__`` wrapped in the offloader's block scope. It
holds the same submodules, parameters and buffers by the same names, so state_dict keys and values stay
the same and ``report.undo()`` puts the originals back; it shares the original's hook dicts themselves,
so a hook registered before converting can be removed after, and one registered while converted stays
after undo. The generated class pickles as "the offloaded class of <original class>" (``torch.save`` of
a converted model loads converted, with a fresh offloader of the same settings). Wrapping ``__call__``,
not ``forward``, puts the scope outside a checkpoint the block applies to itself (Hugging Face's
``GradientCheckpointingLayer``), so only what the checkpoint keeps is offloaded.

`offloading(model)` does the same for the duration of a ``with`` region by switching the blocks' class in
place (as FSDP2's ``fully_shard`` does) and switching it back on exit.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from tightfit._step import LossFn, call_model
from tightfit._tree import tensors_of
from tightfit.convert import ConversionReport, FilterFn, register_converter, replace_module
from tightfit.errors import UserError
from tightfit.offload.config import Offload
from tightfit.offload.engine import HostBudgetExceeded, NestedOffload, Offloader
from tightfit.offload.estimate import unchanged
from tightfit.offload.target import SimulatedTarget, Target, available, target_for
from tightfit.sizes import format_size

__all__ = [
    "NoBlocks",
    "OffloadUnavailable",
    "estimate_host_bytes",
    "find_blocks",
    "offloader_of",
    "offloading",
    "resolve_target",
]

_CONTAINERS = (nn.ModuleList, nn.Sequential)
_CLASSES: dict[type, type] = {}
_REGION: contextvars.ContextVar[bool] = contextvars.ContextVar("_REGION", default=False)


class OffloadUnavailable(UserError, ValueError):
    """Offload was asked for where it cannot lower memory (no accelerator)."""


class NoBlocks(UserError, ValueError):
    """No blocks to offload were found or given."""


# -- blocks -----------------------------------------------------------------------------------------------
def _leaf(module: nn.Module) -> bool:
    return next(iter(module.children()), None) is None


def find_blocks(model: nn.Module) -> list[str]:
    """Paths of the model's blocks by the static rule of the module docstring; [] when there are none."""
    best: tuple[int, int, str] | None = None  # (-params, depth, path)
    for path, module in model.named_modules():
        kids = list(module.children())
        if isinstance(module, _CONTAINERS) and len(kids) >= 2 and not any(_leaf(k) for k in kids):
            params = sum(p.numel() for p in module.parameters())
            key = (-params, path.count(".") + bool(path), path)
            if best is None or key < best:
                best = key
    if best is None:
        return []
    prefix = f"{best[2]}." if best[2] else ""
    return [f"{prefix}{name}" for name, _ in model.get_submodule(best[2]).named_children()]


def _block_paths(model: nn.Module, blocks: Sequence[str | nn.Module] | None) -> list[str]:
    if blocks is None:
        paths = find_blocks(model)
        if not paths:
            raise NoBlocks(
                f"no blocks found in {type(model).__name__}: offload looks for an nn.ModuleList or "
                "nn.Sequential of at least two composite modules (transformer layers); pass blocks=[...] "
                "(module paths or modules) to choose them"
            )
        return paths
    by_id = {id(m): p for p, m in model.named_modules()}
    paths = []
    for b in blocks:
        if isinstance(b, nn.Module):
            if id(b) not in by_id or by_id[id(b)] == "":
                raise NoBlocks(f"blocks= holds a {type(b).__name__} that is not a submodule of the model")
            paths.append(by_id[id(b)])
        elif isinstance(b, str):
            try:
                model.get_submodule(b)
            except AttributeError:
                raise NoBlocks(f"blocks= names {b!r}, which is not a submodule path (see named_modules())") \
                    from None
            if not b:
                raise NoBlocks("blocks= cannot hold the root module: offload its children")
            paths.append(b)
        else:
            raise NoBlocks(f"blocks= must hold module paths or modules, got {type(b).__name__}")
    for p in paths:
        for q in paths:
            if p != q and p.startswith(q + "."):
                raise NoBlocks(f"blocks {q!r} and {p!r} nest: offload scopes do not nest, pick one")
    return paths


def _full_backward_hook_owner(module: nn.Module) -> nn.Module:
    return module.__dict__.get("_tightfit_original", module)


def _get_full_backward_hook(self: nn.Module) -> Any:
    return _full_backward_hook_owner(self).__dict__.get("_is_full_backward_hook")


def _set_full_backward_hook(self: nn.Module, value: Any) -> None:
    _full_backward_hook_owner(self).__dict__["_is_full_backward_hook"] = value


def _new_offloaded(cls: type) -> nn.Module:
    """Unpickling: an empty instance of the offloaded class of `cls` (its state is set after)."""
    sub = _offloaded_class(cls)
    return sub.__new__(sub)


def _reduce_offloaded(self: nn.Module, protocol: int) -> Any:
    """Pickle a converted block as "the offloaded class of <its original class>" plus its state: the
    generated class is made again on load (it is not importable by name)."""
    return (_new_offloaded, (type(self).__bases__[0],), dict(self.__dict__))


def _offloaded_class(cls: type) -> type:
    sub = _CLASSES.get(cls)
    if sub is None:

        def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            offloader = self.__dict__.get("_tightfit_offloader")
            if offloader is None:
                return super(sub, self).__call__(*args, **kwargs)
            with offloader.block(self.__dict__["_tightfit_block"]):
                return super(sub, self).__call__(*args, **kwargs)

        namespace = {
            "__call__": __call__,
            "__module__": __name__,
            "__qualname__": f"Offloaded{cls.__qualname__}",
            "__reduce_ex__": _reduce_offloaded,
            # register_full_backward_hook sets this flag; it lives with the original module, which shares
            # its hook dicts with the copy, so a full backward hook added while converted survives undo
            "_is_full_backward_hook": property(_get_full_backward_hook, _set_full_backward_hook),
        }
        sub = type(f"Offloaded{cls.__name__}", (cls,), namespace)
        _CLASSES[cls] = sub
    return sub


def _is_offloaded(module: nn.Module) -> bool:
    return "_tightfit_offloader" in module.__dict__


def offloader_of(model: nn.Module) -> Offloader | None:
    """The `Offloader` of a converted model (its pool, stats and estimates), or None."""
    for module in model.modules():
        if _is_offloaded(module):
            return module.__dict__["_tightfit_offloader"]
    return None


def _converted_copy(old: nn.Module, offloader: Offloader, name: str) -> nn.Module:
    """The converted block: the original's hook dicts themselves (a hook registered before can be removed
    after, and one registered while converted stays after undo), its own containers of parameters,
    buffers and children holding the same objects (so replacing one while converted is caught by undo)."""
    cls = _offloaded_class(type(old))
    new = cls.__new__(cls)
    for key, value in old.__dict__.items():
        shared = "hook" in key or not isinstance(value, (dict, set))
        new.__dict__[key] = value if shared else copy.copy(value)
    new.__dict__["_tightfit_original"] = old
    new.__dict__["_tightfit_offloader"] = offloader
    new.__dict__["_tightfit_block"] = name
    return new


# -- the target -------------------------------------------------------------------------------------------
def _model_device(model: nn.Module) -> torch.device | None:
    for t in tensors_of(model):
        return t.device
    return None


def resolve_target(model: nn.Module, config: Offload, target: Target | None) -> Target:
    """The given target, or the real one for the model's device; a clear error where there is none."""
    if target is not None:
        if not isinstance(target, Target):
            raise TypeError(f"target= must be a tightfit.offload Target, got {type(target).__name__}")
        return target
    device = _model_device(model)
    if device is None or not available(device):
        where = "has no parameters or buffers" if device is None else f"is on {device}"
        raise OffloadUnavailable(
            f"Offload moves saved tensors from an accelerator to host memory, but the model {where}"
            + ("" if device is None else ", where host and device memory are the same, so offloading "
               "cannot lower the peak")
            + ". Move the model to a CUDA device first (model.cuda()); tests and dry runs can pass "
            "target=tightfit.offload.SimulatedTarget()"
        )
    out = target_for(device, pin=config.pin)
    assert out is not None
    return out


# -- estimate ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _swapped(model: nn.Module, paths: Sequence[str], offloader: Offloader) -> Iterator[None]:
    """Switch the blocks' class in place for the region (what `offloading` and estimates use)."""
    done: list[tuple[nn.Module, type]] = []
    try:
        for path in paths:
            module = model.get_submodule(path)
            if _is_offloaded(module):
                raise NestedOffload(
                    f"{path} is already offloaded (converted with tightfit.convert_ or inside another "
                    "offloading region); offload regions do not nest"
                )
            done.append((module, type(module)))
            module.__class__ = _offloaded_class(type(module))
            module.__dict__["_tightfit_offloader"] = offloader
            module.__dict__["_tightfit_block"] = path
        yield
    finally:
        for module, cls in reversed(done):
            module.__class__ = cls
            module.__dict__.pop("_tightfit_offloader", None)
            module.__dict__.pop("_tightfit_block", None)


def estimate_host_bytes(
    model: nn.Module,
    example: Any,
    config: Offload | None = None,
    *,
    blocks: Sequence[str | nn.Module] | None = None,
    target: Target | None = None,
    loss_fn: LossFn | None = None,
) -> tuple[int, list[tuple[str, int]]]:
    """Host bytes one forward on `example` would offload, and the bytes per block call (in order).

    Runs the forward once with nothing moved (every RNG and the model's buffers, BatchNorm statistics
    included, restored after: `unchanged`), applying the same rules as the real run, the last
    ``keep_last`` block calls included in the list but not in the total.
    """
    del loss_fn  # the forward alone saves what the backward reads
    config = config if config is not None else Offload()
    paths = _block_paths(model, blocks)
    target = resolve_target(model, config, target)
    dry = Offloader(config, target, protect=model, dry_run=True)
    with unchanged(model), _swapped(model, paths, dry), torch.enable_grad():
        out = call_model(model, example)
        del out
    planned = list(dry.planned)
    kept = planned[len(planned) - config.keep_last:] if config.keep_last else []
    return sum(n for _, n in planned) - sum(n for _, n in kept), planned


# -- convert_ ---------------------------------------------------------------------------------------------
@register_converter(Offload)
def _convert_offload(
    model: nn.Module,
    config: Offload,
    filter_fn: FilterFn | None = None,
    *,
    target: Target | None = None,
    blocks: Sequence[str | nn.Module] | None = None,
    example: Any = None,
    loss_fn: LossFn | None = None,
    trace: bool = False,
) -> ConversionReport:
    """The `tightfit.convert_` handler for `Offload`: find the blocks, check, then wrap each one.

    Options: ``target=`` (a `SimulatedTarget` for tests and dry runs; default: the model's CUDA device),
    ``blocks=`` (paths or modules), ``example=`` (a batch: the host bytes are estimated and checked
    against ``max_host_bytes`` before anything changes), ``trace=`` (record the copy order).
    """
    target = resolve_target(model, config, target)
    paths = _block_paths(model, blocks)
    report = ConversionReport(technique=f"Offload(min_bytes={format_size(config.min_bytes)}, "  # type: ignore[arg-type]
                              f"keep_last={config.keep_last}, prefetch={config.prefetch})")
    chosen = []
    for path in paths:
        module = model.get_submodule(path)
        if _is_offloaded(module):
            report.skipped.append((path, "already offloaded"))
        elif filter_fn is not None and not filter_fn(module, path):
            report.skipped.append((path, "filter_fn returned False"))
        else:
            chosen.append(path)
    if example is not None and chosen:
        host, planned = estimate_host_bytes(model, example, config, blocks=chosen, target=target)
        report.metrics["host_bytes_estimate"] = host
        report.metrics["planned_bytes"] = planned
        if config.max_host_bytes is not None and host > config.max_host_bytes:  # type: ignore[operator]
            raise HostBudgetExceeded(
                f"offloading {len(chosen)} block(s) would hold {format_size(host)} ({host} bytes) on the "
                f"host for this batch, more than Offload.max_host_bytes = "
                f"{format_size(config.max_host_bytes)}; "
                "raise max_host_bytes, offload fewer blocks (filter_fn=) or use a smaller batch"
            )
    offloader = Offloader(config, target, protect=model, trace=trace)
    for path in chosen:
        old = model.get_submodule(path)
        new = _converted_copy(old, offloader, path)
        replace_module(model, path, new)
        report.converted.append((path, type(old).__name__, type(new).__name__))
    report.metrics["blocks"] = len(chosen)
    report.notes.append(
        f"what the last {config.keep_last} block call(s) before the backward save stays on the device "
        "(decided by call order at run time)"
    )
    if isinstance(target, SimulatedTarget):
        report.notes.append("simulated target: the mechanism runs on the CPU and saves no memory")
    if not chosen:
        report.notes.append("no block converted")
    return report


# -- region -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def offloading(
    model: nn.Module | None = None,
    config: Offload | None = None,
    *,
    blocks: Sequence[str | nn.Module] | None = None,
    target: Target | None = None,
    trace: bool = False,
) -> Iterator[Offloader]:
    """Offload what `model`'s blocks save in the forward passes run inside the ``with``; yields the
    `Offloader`. The backward may run after the region ends.

    Without a model, nothing is offloaded except inside the ``offloader.block(name)`` scopes the code
    opens (a ``target=`` is then required). Regions do not nest (`NestedOffload`).
    """
    config = config if config is not None else Offload()
    if _REGION.get():
        raise NestedOffload("an offloading region is already active; offload regions do not nest")
    if model is None:
        if target is None:
            raise OffloadUnavailable(
                "offloading() without a model needs target= (tightfit.offload.CudaTarget() or "
                "SimulatedTarget())"
            )
        paths: list[str] = []
        resolved = target
    else:
        resolved = resolve_target(model, config, target)
        paths = _block_paths(model, blocks)
    offloader = Offloader(config, resolved, protect=model if model is not None else (), trace=trace)
    token = _REGION.set(True)
    try:
        if model is None:
            yield offloader
        else:
            with _swapped(model, paths, offloader):
                yield offloader
    finally:
        _REGION.reset(token)
