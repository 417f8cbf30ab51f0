"""Benchmarks of randomized linear layers: one layer, convergence on real data."""
