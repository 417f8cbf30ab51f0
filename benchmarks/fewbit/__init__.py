"""Benchmarks of few-bit activation gradients: the ops, whole models, convergence on real data."""
