"""The allocator's peak of a piece of code, read without a dispatch mode: a cross-check of the ruler.

``LiveTracker`` is a Python ``TorchDispatchMode``, and with any such mode active autograd accumulates some
gradients out of place where it would add in place (a gradient flowing into a tensor several ops read, an
RNN's per-step input slices): the observed step then briefly holds two buffers where the plain step holds
one. The allocator's own count of the plain step shows what that costs:

- CPU: the profiler's memory events (``profile_memory=True``) record every allocation and free of the CPU
  allocator; the peak is the maximum of their running sum.
- CUDA: the caching allocator's ``max_memory_allocated`` above the start (its block rounding included).

On the CPU the profiler records no free of a block allocated before it started, so ``fn`` should not free
tensors that existed before it (set gradients to None before, not inside, the measured step), and it sees
every thread of the process (a communication backend's own buffers included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def allocator_peak(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Bytes above the start at the allocator's peak while ``fn()`` runs on ``device`` (CPU or CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    if device.type != "cpu":
        raise ValueError(f"allocator_peak reads the CPU or CUDA allocator, not {device.type!r}")
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = prof.profiler.kineto_results  # type: ignore[union-attr]
    events = [e for e in results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == DeviceType.CPU:
            current += event.nbytes()
            peak = max(peak, current)
    return peak
