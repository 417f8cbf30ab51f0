"""Few-bit activation gradients: optimal derivative tables, exact b-bit codec, ops and drop-ins."""
