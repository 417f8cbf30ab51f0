"""The harness every benchmark shares: `timing` (interleaved rounds, paired sign test), `results` (result
files under benchmarks/results/latest and history, with provenance) and `steps` (exact peaks of training
steps, gradient checks)."""
