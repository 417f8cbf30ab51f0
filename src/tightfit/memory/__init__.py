"""The ruler: exact measurement of what a training step keeps and when memory peaks.

- `LiveTracker`: live tensor bytes over any code (peak, where, per module, timeline);
- `SavedTensorCounter`: bytes a forward pass keeps for backward, checkpoint regions included;
- `profile` / `estimate`: a whole training step as a `MemoryReport`, real or under FakeTensorMode;
- `allocator_peak`: the allocator's peak of code run without a dispatch mode (the ruler's cross-check);
- `tightfit.memory.distributed`: ranks, the order techniques and DDP/FSDP2 compose in, per-rank budgets,
  a fake process group for estimates; `tightfit.memory.fakecuda`: estimating a CUDA step on a CPU.
"""

from tightfit.memory.allocator import allocator_peak
from tightfit.memory.live import LiveTracker, ModulePeaks, TimelinePoint
from tightfit.memory.profile import ensure_optimizer_state, estimate, profile, unique_bytes
from tightfit.memory.report import MemoryReport, ModuleMemory, RankPeak
from tightfit.memory.saved import SavedTensorCounter

__all__ = [
    # measuring tools
    "LiveTracker",
    "SavedTensorCounter",
    "allocator_peak",
    "unique_bytes",
    "ensure_optimizer_state",
    # whole training steps
    "profile",
    "estimate",
    # results
    "MemoryReport",
    "ModuleMemory",
    "RankPeak",
    "ModulePeaks",
    "TimelinePoint",
]
