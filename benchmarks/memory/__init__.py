"""Benchmarks of the ruler: estimating a step without allocating, and the ruler against the allocator."""
