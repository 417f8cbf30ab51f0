"""One-line entries into the training loops users already run (issue in progress)."""
