"""Benchmarks of offloading saved activations to host memory."""
