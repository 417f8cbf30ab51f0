"""Rematerialization: solvers (pure algorithms) and automatic recomputation of unmodified models."""
