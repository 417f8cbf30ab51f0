"""Offload saved activations to host memory (issue in progress)."""
