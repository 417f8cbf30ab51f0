"""Offload what a model's blocks save for backward to host memory, overlapped with compute.

``tightfit.convert_(model, tightfit.Offload())`` wraps the model's blocks (``report.undo()`` unwraps them);
``with tightfit.offload.offloading(model): loss = model(x)`` does it for a region of code. Copies run on
a side stream into a pinned host pool of exact-size buffers reused across steps; the backward fetches
block i-1 back while block i's backward runs. Parameters, buffers, small tensors and what the last block
saves stay. The device specifics sit behind `Target` (`CudaTarget`; `SimulatedTarget` runs the mechanism
on the CPU for tests and dry runs). docs/offload.md has the contract of the planner-facing API.
"""

from tightfit.offload.config import Offload
from tightfit.offload.convert import (
    NoBlocks,
    OffloadUnavailable,
    estimate_host_bytes,
    find_blocks,
    offloader_of,
    offloading,
    resolve_target,
)
from tightfit.offload.engine import HostBudgetExceeded, HostPool, NestedOffload, Offloader, OffloadStats
from tightfit.offload.estimate import (
    BlockEstimate,
    copy_seconds,
    estimate_block,
    exposed_seconds,
    host_bandwidth,
)
from tightfit.offload.target import CudaTarget, SimulatedTarget, Target, available, target_for

__all__ = [
    # configuration and entry points
    "Offload",
    "offloading",
    "offloader_of",
    "find_blocks",
    # the mechanism
    "Offloader",
    "OffloadStats",
    "HostPool",
    # targets
    "Target",
    "CudaTarget",
    "SimulatedTarget",
    "available",
    "target_for",
    "resolve_target",
    # estimates for planners
    "BlockEstimate",
    "estimate_block",
    "estimate_host_bytes",
    "host_bandwidth",
    "copy_seconds",
    "exposed_seconds",
    # errors
    "OffloadUnavailable",
    "HostBudgetExceeded",
    "NestedOffload",
    "NoBlocks",
]
