"""The one-budget planner across recompute, offload, few-bit and sketch (issue in progress)."""
