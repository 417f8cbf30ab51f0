"""Estimate a step meant for a CUDA GPU on a machine without one: fake CPU tensors that take the GPU's paths.

A CPU-only PyTorch cannot run fake CUDA tensors through every op: kernels guarded by a CUDA device guard
(indexing, random fills, ``.to("cuda")``) fail with "PyTorch is not linked with support for cuda devices",
and ``scaled_dot_product_attention`` aborts the process choosing its kernel. So the estimate runs on fake
*CPU* tensors under `CudaDisguise`, a ``TorchFunctionMode`` that makes the step take what the GPU would:

NOTE [ What the disguise changes ]
  1. Devices: a ``device=`` naming CUDA (factories, ``.to``) becomes the CPU; ``.cuda()`` returns the tensor.
     The report then names the GPU (``cuda:0``) for what ran there.
  2. Attention: ``F.scaled_dot_product_attention`` calls the CUDA kernel the GPU picks (torch's priority
     on sm80 and later: flash, then memory-efficient, then math): flash for fp16/bf16 without a mask and
     head dimension <= 256 (a multiple of 8); memory-efficient with a mask or in fp32 (a boolean mask
     becomes an additive bias of the query's dtype, as on the GPU); math otherwise. Flash and
     memory-efficient keep the output and a log-sum-exp per query row for backward, not the T x T
     probabilities. Their meta kernels, which fake tensors run, are torch's own. Grouped-query attention
     repeats k/v before the kernel (an upper bound where the GPU kernel reads them grouped).
  3. Autocast (``torch.autocast("cuda")`` is disabled on a CPU-only PyTorch): where CPU autocast is
     enabled (``estimate`` enables it around the forward; ``CudaDisguise(autocast=torch.bfloat16)`` for
     as long as the disguise is active), CUDA's op lists apply instead of the CPU's: matmuls, linear,
     convolutions and attention run in the low precision; norms, softmax, log-softmax, losses,
     exp/log/pow/rsqrt in float32; each op itself runs with CPU autocast off. Because the switch is CPU
     autocast's own state, ``checkpoint`` replays it in its recompute, and a model's
     ``torch.autocast(..., enabled=False)`` region runs in full precision, as on the GPU. The backward
     (``tensor.backward``, ``torch.autograd.backward``) runs with the disguise active, so the recompute
     takes the same paths as the forward (``torch.autograd.grad`` runs without it).
     Autocast's cache of cast weights is not modelled: each use casts the weight again, and the cast is
     freed with the op's saved tensors. Real autocast keeps the low-precision copy of each float32 leaf
     parameter until the autocast region exits, also for blocks whose saved tensors a checkpoint drops,
     so with recompute the estimate can under-count by up to the low-precision bytes of the float32
     parameters used in the forward (half their float32 bytes); without recompute those copies are
     saved for backward and counted either way.
  Approximate, then: allocator rounding (CUDA rounds blocks to 512 bytes and caches freed blocks),
  workspaces kernels take (cuBLAS, flash), and kernels chosen by other rules (cuDNN attention, other
  GPUs, other torch versions) are not modelled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# CUDA autocast's lists (aten/src/ATen/autocast_mode.cpp), by the Python functions that reach those ops
_LOWER: set[Callable[..., Any]] = {
    F.linear,
    F.bilinear,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    F.prelu,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.mm,
    torch.Tensor.mm,
    torch.bmm,
    torch.Tensor.bmm,
    torch.addmm,
    torch.Tensor.addmm,
    torch.baddbmm,
    torch.Tensor.baddbmm,
    torch.einsum,
}
_FLOAT32: set[Callable[..., Any]] = {
    F.layer_norm,
    F.group_norm,
    F.softmax,
    F.log_softmax,
    torch.softmax,
    torch.log_softmax,
    torch.Tensor.softmax,
    torch.Tensor.log_softmax,
    F.cross_entropy,
    F.nll_loss,
    F.mse_loss,
    F.l1_loss,
    F.smooth_l1_loss,
    F.kl_div,
    F.binary_cross_entropy_with_logits,
    torch.exp,
    torch.Tensor.exp,
    torch.log,
    torch.Tensor.log,
    torch.pow,
    torch.Tensor.pow,
    torch.rsqrt,
    torch.Tensor.rsqrt,
    torch.cumsum,
    torch.Tensor.cumsum,
}
_CAST_FROM = (torch.float16, torch.bfloat16, torch.float32)


def is_cuda(device: Any) -> bool:
    """Whether ``device`` (a ``torch.device``, a string, an index) names a CUDA device."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return False


def _cast(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype in _CAST_FROM and x.dtype != dtype:
        return x.to(dtype)
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype) for v in x)
    return x


def sdpa_kernel(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None) -> str:
    """ "flash", "efficient" or "math": the CUDA kernel SDPA takes for these inputs (NOTE 2)."""
    head_dim = q.shape[-1]
    if attn_mask is None and q.dtype in (torch.float16, torch.bfloat16) and head_dim <= 256:
        if head_dim % 8 == 0 and k.shape[-1] == head_dim:
            return "flash"
    alignment = 4 if q.dtype == torch.float32 else 8
    if q.dtype in (torch.float16, torch.bfloat16, torch.float32) and head_dim % alignment == 0:
        return "efficient"
    return "math"


def sdpa_as_cuda(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` through the CUDA kernel the GPU would take (NOTE 2)."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    kernel = sdpa_kernel(query, key, attn_mask)
    if kernel == "flash":
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale
        )[0]
    if kernel == "efficient":
        bias = attn_mask
        if bias is not None and bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=query.dtype, device=query.device).masked_fill_(
                bias.logical_not(), float("-inf")
            )
        if bias is not None:
            bias = bias.to(query.dtype).expand(*query.shape[:-1], key.shape[-2])
        grad = any(t.requires_grad for t in (query, key, value))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, grad, dropout_p, is_causal, scale=scale
        )[0]
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale
    )[0]


_BACKWARD = (torch.Tensor.backward, torch.autograd.backward)


class CudaDisguise(TorchFunctionMode):
    """``with FakeTensorMode(), CudaDisguise(): ... with torch.autocast("cpu", torch.bfloat16): step()``:
    fake CPU tensors take the paths a CUDA GPU would (NOTE [ What the disguise changes ]). CUDA's
    autocast lists apply where CPU autocast is enabled; ``CudaDisguise(autocast=torch.bfloat16)``
    enables it for as long as the disguise is active."""

    def __init__(self, autocast: torch.dtype | None = None) -> None:
        super().__init__()
        if autocast is not None and autocast not in (torch.float16, torch.bfloat16):
            raise ValueError(f"autocast must be torch.float16 or torch.bfloat16, got {autocast}")
        self.autocast = autocast
        self._amp: Any = None

    def __enter__(self) -> CudaDisguise:
        if self.autocast is not None:
            self._amp = torch.autocast("cpu", dtype=self.autocast)
            self._amp.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._exit_amp(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._exit_amp(*exc)

    def _exit_amp(self, *exc: Any) -> None:
        amp, self._amp = self._amp, None
        if amp is not None:
            amp.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        if func in _BACKWARD:
            # the backward runs with this mode popped (it is a torch function itself): run autograd's
            # engine with it pushed again, so what Python runs there (checkpoint's recompute, custom
            # Functions) takes the same paths as in the forward
            return _backward_in_mode(self, func, args, kwargs)
        if is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if is_cuda(a) else a for a in args)
        if not torch.is_autocast_enabled("cpu"):
            if func is F.scaled_dot_product_attention:
                return sdpa_as_cuda(*args, **kwargs)
            return func(*args, **kwargs)
        # NOTE 3: CUDA's lists instead of the CPU's: cast here, run the op with CPU autocast off
        low = torch.get_autocast_dtype("cpu")
        if func in _LOWER or func is F.scaled_dot_product_attention:
            args = _cast(args, low)
            kwargs = {k: _cast(v, low) for k, v in kwargs.items()}
        elif func in _FLOAT32:
            args = _cast(args, torch.float32)
            kwargs = {k: _cast(v, torch.float32) for k, v in kwargs.items()}
        torch.set_autocast_enabled("cpu", False)
        try:
            if func is F.scaled_dot_product_attention:
                return sdpa_as_cuda(*args, **kwargs)
            return func(*args, **kwargs)
        finally:
            torch.set_autocast_enabled("cpu", True)


def _backward_in_mode(mode: TorchFunctionMode, func: Any, args: tuple, kwargs: dict[str, Any]) -> None:
    """``tensor.backward(...)`` / ``torch.autograd.backward(...)``, as torch runs them once past their
    torch-function check (torch/autograd/__init__.py), with ``mode`` on the stack."""
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    if func is torch.Tensor.backward:
        names = ("gradient", "retain_graph", "create_graph", "inputs")
        tensors, rest = args[0], dict(zip(names, args[1:]), **kwargs)
        grads = rest.get("gradient")
    else:
        names = ("grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs")
        tensors, rest = args[0], dict(zip(names, args[1:]), **kwargs)
        grads = rest.get("grad_tensors")
        if grads is None:
            grads = rest.get("grad_variables")
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    inputs = rest.get("inputs")
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs) if inputs is not None else ()
    create_graph = bool(rest.get("create_graph", False))
    retain_graph = rest.get("retain_graph")
    with _Reentered(mode):
        grads_ = _tensor_or_tensors_to_tuple(grads, len(tensors))
        grads_ = _make_grads(tensors, grads_, is_grads_batched=False)
        _engine_run_backward(
            tensors,
            grads_,
            create_graph if retain_graph is None else retain_graph,
            create_graph,
            inputs,
            allow_unreachable=True,
            accumulate_grad=True,
        )


class _Reentered:
    """Push a mode that is handling a torch function back onto the stack for the call's duration."""

    def __init__(self, mode: TorchFunctionMode) -> None:
        self.mode = mode

    def __enter__(self) -> None:
        TorchFunctionMode.__enter__(self.mode)

    def __exit__(self, *exc: Any) -> None:
        TorchFunctionMode.__exit__(self.mode, *exc)
