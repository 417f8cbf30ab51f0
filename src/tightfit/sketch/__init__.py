"""Randomized linear layers: sketched inputs, unbiased weight gradients, variance diagnostics."""
