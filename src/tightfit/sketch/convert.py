"""`convert_(model, Sketch(...))`: turn nn.Linear and GPT-2 Conv1D layers into randomized ones, in place.

Parameters are shared with the original layers, so state_dict keys and values do not change. Everything
is checked and every replacement is built before the model is touched. Layers with a frozen weight
(``requires_grad=False``, e.g. the base layers of a peft LoRA model) are skipped: autograd keeps no input
for a frozen weight's gradient, so there is nothing to sketch (LoRA's adapter layers are trainable and are
sketched). ``nn.MultiheadAttention`` is reported as skipped: it never calls its projection modules.

NOTE (what is really saved): a sketch frees memory only if nothing else keeps the layer's input X alive
for backward. Two cases matter:
  1. Layers reading the same tensor (q/k/v on one LayerNorm output). Plain layers share one saved X. With
     `Sketch(shared="share")` (default) the converted layers share one sketch, so they keep k·d instead
     of N·d. Sharing is decided at run time by tensor identity, so no example batch is needed.
  2. X also saved by another op (an unconverted linear, an elementwise product, ...). Converting frees
     nothing and only adds variance. Only a probe forward can see this: pass
     ``convert_(model, Sketch(...), example=batch)`` (with ``loss_fn=`` when the batch is not in the
     `tightfit._step` convention). Such layers are skipped (`kept_alive="skip"`) and reported. With an
     example, the real peak of one training step before and after conversion is measured with the ruler
     (tightfit.memory.LiveTracker) and reported next to the predicted saving (``measure=False`` skips
     that measurement).

The probe and the measurement leave the model as they found it: buffers (BatchNorm statistics, ...) and
gradients are restored, and the random number generators of the CPU and of every CUDA device holding the
model's parameters or the example are forked, so conversion consumes no random numbers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tightfit._rng import forked_rng
from tightfit._step import forward_loss
from tightfit._tree import StorageKey, leaves, storage_key
from tightfit.convert import ConversionReport, FilterFn, register_converter, replace_module
from tightfit.memory import LiveTracker
from tightfit.sizes import format_size
from tightfit.sketch.config import Sketch
from tightfit.sketch.modules import RandomizedConv1D, RandomizedLinear
from tightfit.sketch.ops import SketchShare, resolve_k

__all__ = ["probe_inputs", "InputProbe", "find_candidates"]


def _conv1d_type() -> type | None:
    mod = sys.modules.get("transformers.pytorch_utils")  # never import transformers ourselves
    return getattr(mod, "Conv1D", None) if mod is not None else None


def _in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]


def _describe(module: nn.Module) -> str:
    name = type(module).__name__
    if isinstance(module, nn.Linear):
        return f"{name}({module.in_features}->{module.out_features})"
    return f"{name}({module.weight.shape[0]}->{module.weight.shape[1]})"


_MHA_REASON = (
    "nn.MultiheadAttention computes its projections inside F.multi_head_attention_forward from "
    "in_proj_weight and out_proj.weight directly (its out_proj module is never called), so no layer can be "
    "swapped; sketching them needs an attention written with nn.Linear projections (as Hugging Face "
    "models are)"
)
_FROZEN_REASON = (
    "frozen weight (requires_grad=False): autograd keeps no input for its weight gradient, so a sketch "
    "would save nothing (e.g. a LoRA base layer; its adapters are sketched instead)"
)


def find_candidates(model: nn.Module, filter_fn: FilterFn | None = None) -> tuple[dict[str, nn.Module], list]:
    """(path -> convertible module, [(path, reason)] for modules that look convertible but are not)."""
    conv1d = _conv1d_type()
    found: dict[str, nn.Module] = {}
    skipped: list[tuple[str, str]] = []
    for path, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and (filter_fn is None or filter_fn(module, path)):
            skipped.append((path, _MHA_REASON))
            continue
        is_linear = isinstance(module, nn.Linear)
        is_conv1d = conv1d is not None and type(module) is conv1d
        if not (is_linear or is_conv1d):
            continue
        if filter_fn is not None and not filter_fn(module, path):
            continue
        if isinstance(module, RandomizedLinear):
            skipped.append((path, "already a RandomizedLinear"))
        elif is_linear and type(module) is not nn.Linear:
            # e.g. NonDynamicallyQuantizableLinear: nn.MultiheadAttention reads its weight directly
            skipped.append((path, f"{type(module).__name__} is a Linear subclass with its own semantics"))
        elif not module.weight.requires_grad:
            skipped.append((path, _FROZEN_REASON))
        elif not module.weight.is_floating_point():
            skipped.append((path, f"weight dtype {module.weight.dtype} is not floating point"))
        elif not path:
            skipped.append((path, "the root module cannot be replaced in place"))
        else:
            found[path] = module
    return found, skipped


@dataclass
class InputProbe:
    """What one probe forward saw: per candidate its input storage and token count, and which storages
    other ops (anything outside the candidates, parameters excluded) saved for backward."""

    input_key: dict[str, StorageKey] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    elt: dict[str, int] = field(default_factory=dict)
    saved_by_others: set[StorageKey] = field(default_factory=set)

    def groups(self) -> dict[StorageKey, list[str]]:
        """Candidates grouped by the storage of their input (several layers reading one tensor)."""
        out: dict[StorageKey, list[str]] = {}
        for path, key in self.input_key.items():
            out.setdefault(key, []).append(path)
        return out


def _storage_key(t: torch.Tensor) -> StorageKey:
    """`tightfit._tree.storage_key`; a tensor without a storage (sparse, ...) counts as its own storage."""
    key = storage_key(t)
    return key if key is not None else (id(t), 0)


def probe_inputs(
    model: nn.Module, candidates: dict[str, nn.Module], example: Any, loss_fn: Any = None
) -> InputProbe:
    """Run one forward on `example` (random number generators forked: see the module docstring) and
    record, for each candidate, its input storage, and the storages that ops outside the candidates save
    for backward."""
    probe = InputProbe()
    params = {_storage_key(p) for p in model.parameters()} | {_storage_key(b) for b in model.buffers()}
    depth = 0  # > 0 while inside a candidate: what it saves is its own input, not another op's
    handles = []

    def pre(path: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple) -> None:
            nonlocal depth
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and path not in probe.input_key:
                probe.input_key[path] = _storage_key(x)
                probe.tokens[path] = x.numel() // max(1, _in_features(module))
                probe.elt[path] = x.element_size()
            depth += 1

        return hook

    def post(module: nn.Module, args: tuple, out: Any) -> None:
        nonlocal depth
        depth -= 1

    def pack(t: torch.Tensor) -> torch.Tensor:
        if depth == 0:
            key = _storage_key(t)
            if key not in params:
                probe.saved_by_others.add(key)
        return t

    for path, module in candidates.items():
        handles.append(module.register_forward_pre_hook(pre(path)))
        handles.append(module.register_forward_hook(post))
    try:
        with (
            forked_rng([*model.parameters(), *model.buffers(), *leaves(example)]),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            loss = forward_loss(model, example, loss_fn)
            del loss
    finally:
        for h in handles:
            h.remove()
    return probe


def _measure_peak(
    model: nn.Module, example: Any, loss_fn: Callable[[Any], torch.Tensor] | None = None
) -> int:
    """Live-tensor peak (bytes) of one forward+backward on `example`, params/grads restored."""
    grads = [(p, p.grad) for p in model.parameters()]
    for p, _ in grads:
        p.grad = None
    try:
        with (
            forked_rng([*model.parameters(), *model.buffers(), *leaves(example)]),
            LiveTracker(track=[model, example]) as tracker,
        ):
            loss = forward_loss(model, example, loss_fn)
            loss.backward()
            del loss
        return tracker.peak
    finally:
        for p, g in grads:
            p.grad = g


def _build(path: str, module: nn.Module, config: Sketch, share: SketchShare | None) -> nn.Module:
    opts = {**config.module_options(), "share": share}
    if isinstance(module, nn.Linear):
        return RandomizedLinear.from_linear(module, **opts)
    return RandomizedConv1D(module, **opts)


@register_converter(Sketch)
def _convert_sketch(
    model: nn.Module,
    config: Sketch,
    filter_fn: FilterFn | None = None,
    *,
    example: Any = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    measure: bool = True,
) -> ConversionReport:
    """The `tightfit.convert_` handler for `Sketch` (see the module docstring). With `example` (a batch in
    the `_step` convention, or any batch with `loss_fn`), also detect inputs kept alive by other ops and,
    unless `measure` is false, measure the real peak change of one training step."""
    report = ConversionReport(
        technique=f"sketch ({config.sketch}, "
        + (f"ratio={config.ratio})" if config.k is None else f"k={config.k})")
    )
    candidates, skipped = find_candidates(model, filter_fn)
    report.skipped.extend(skipped)

    # the probe and measurement steps must not move running statistics (BatchNorm, ...)
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if example is not None else []
    try:
        return _convert(model, config, report, candidates, example, loss_fn, measure)
    finally:
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)


def _convert(
    model: nn.Module,
    config: Sketch,
    report: ConversionReport,
    candidates: dict[str, nn.Module],
    example: Any,
    loss_fn: Callable[[Any], torch.Tensor] | None,
    measure: bool,
) -> ConversionReport:
    probe = probe_inputs(model, candidates, example, loss_fn) if example is not None else None
    chosen = dict(candidates)
    if probe is not None:
        for path in list(chosen):
            if path not in probe.input_key:
                if config.kept_alive == "skip":
                    report.skipped.append((path, "not called in the probe forward (nothing to save)"))
                    del chosen[path]
            elif probe.input_key[path] in probe.saved_by_others and config.kept_alive == "skip":
                report.skipped.append(
                    (path, "its input is also saved for backward by another op: a sketch would free nothing")
                )
                del chosen[path]
        for path in chosen:  # errors (k > N) before anything is mutated
            if path in probe.tokens:
                resolve_k(probe.tokens[path], config.ratio if config.k is None else None, config.k)

    share = SketchShare() if config.shared == "share" else None
    built = {path: _build(path, candidates[path], config, share) for path in chosen}
    before_peak = _measure_peak(model, example, loss_fn) if (probe is not None and measure) else None
    for path, new in built.items():
        replace_module(model, path, new)
        report.converted.append((path, _describe(candidates[path]), _describe_new(new)))

    notes, predicted = _predicted_notes(config, candidates, chosen, probe)
    report.notes.extend(notes)
    report.metrics = {"predicted_saved_bytes": predicted, "peak_before": before_peak, "peak_after": None}
    if before_peak is not None:
        after_peak = _measure_peak(model, example, loss_fn)
        report.metrics["peak_after"] = after_peak
        delta = before_peak - after_peak
        report.notes.append(
            f"measured peak of one training step on the example (ruler): {format_size(before_peak)} -> "
            f"{format_size(after_peak)} ({'-' if delta >= 0 else '+'}{format_size(abs(delta))}, "
            f"{100 * delta / max(1, before_peak):.1f}% less)"
        )
    if config.shared == "share":
        report.notes.append(
            "layers reading the same input share one sketch (eager mode; under torch.compile "
            "each layer sketches separately)"
        )
    return report


def _describe_new(module: nn.Module) -> str:
    size = f"ratio={module.ratio}" if module.k is None else f"k={module.k}"
    return f"{type(module).__name__}({size}, {module.sketch})"


def _predicted_notes(
    config: Sketch, candidates: dict, chosen: dict, probe: InputProbe | None
) -> tuple[list[str], int | None]:
    """Report lines on the predicted saving, and the saving in bytes when an example fixes N."""
    if not chosen:
        return [], 0
    if probe is None:
        # without an example: per token, assuming every converted layer's input is freed
        ratio = config.ratio if config.k is None else None
        per_token = sum(_in_features(candidates[p]) * candidates[p].weight.element_size() for p in chosen)
        if ratio is None:
            return [
                f"predicted saving: up to (N - {config.k}) x {per_token} bytes per call of the model "
                "(N = tokens), if no other op keeps the inputs; pass example= to check and measure"
            ], None
        return [
            f"predicted saving: up to {(1 - ratio) * per_token:.0f} bytes per token ({1 - ratio:.0%} of the "
            f"{per_token} bytes/token the converted inputs take), counting shared inputs once per layer; "
            "pass example= to check what other ops keep alive and to measure the real peak"
        ], None
    saving = 0
    exact: list[str] = []
    groups = probe.groups()
    seen: set[StorageKey] = set()
    for path in chosen:
        key = probe.input_key.get(path)
        if key is None or key in seen:
            continue
        seen.add(key)
        readers = groups[key]
        n, d, elt = probe.tokens[path], _in_features(candidates[path]), probe.elt[path]
        kk = resolve_k(n, config.ratio if config.k is None else None, config.k)
        if key in probe.saved_by_others or any(p not in chosen for p in readers):
            continue  # the input stays alive anyway
        if kk >= n or n < config.min_tokens:
            exact.extend(readers)  # runs exactly: no sketch would be smaller
            continue
        sketches = 1 if config.shared == "share" else len(readers)
        per_sketch = kk * d * elt + 8 + (8 * kk if config.sketch == "norm_rows" else 0)
        saving += n * d * elt - sketches * per_sketch
    shared_groups = sum(1 for key in seen if len(groups[key]) > 1)
    notes = [
        f"predicted saving on the example: {format_size(saving)} of saved activations "
        f"({len(seen)} distinct inputs, {shared_groups} read by several converted layers)"
    ]
    if exact:
        notes.append(
            f"{len(exact)} converted layer(s) run exactly on the example (k >= N tokens or N < "
            f"min_tokens, no saving): {', '.join(exact[:8])}{' ...' if len(exact) > 8 else ''}"
        )
    return notes, saving
