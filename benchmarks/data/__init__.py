"""Real data and a pretrained model for the convergence benchmarks (installed by ``make data``)."""
