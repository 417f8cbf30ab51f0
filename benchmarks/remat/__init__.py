"""Benchmarks of rematerialization against PyTorch's own options (GPT-2, CNNs, an LSTM) and its overhead."""
