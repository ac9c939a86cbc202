"""Measurements: collectives (``bench comm``), the TP training and decode step against PyTorch's
tensor parallelism and single-process baselines (``bench step``), serving (``bench serve``)."""
