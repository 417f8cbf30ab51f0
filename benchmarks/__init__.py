"""tightfit's benchmarks, run as modules from the repository root: ``python -m benchmarks.solvers``.

``benchmarks.common`` is the shared harness (interleaved timing, the paired sign test, result files with
provenance); the scripts are grouped by area (``memory``, ``fewbit``, ``sketch``, ``remat``, ``solvers``),
real-data loaders live in ``benchmarks.data``. Index and method: benchmarks/README.md.
"""
