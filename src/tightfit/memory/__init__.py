"""The ruler: exact measurement of what a training step keeps and when memory peaks.

- `LiveTracker`: live tensor bytes over any code (peak, where, per module, timeline);
- `SavedTensorCounter`: bytes a forward pass keeps for backward, checkpoint regions included;
- `profile` / `estimate`: a whole training step as a `MemoryReport`, real or under FakeTensorMode;
- `allocator_peak`: the allocator's peak of code run without a dispatch mode (the ruler's cross-check).
"""

from tightfit.memory.allocator import allocator_peak
from tightfit.memory.live import LiveTracker, ModulePeaks, TimelinePoint
from tightfit.memory.profile import ensure_optimizer_state, estimate, profile, unique_bytes
from tightfit.memory.report import MemoryReport, ModuleMemory
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
    "ModulePeaks",
    "TimelinePoint",
]
