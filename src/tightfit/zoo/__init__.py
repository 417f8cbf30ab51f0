"""Model factories with sample batches, for benchmarks, the CLI and tests."""
