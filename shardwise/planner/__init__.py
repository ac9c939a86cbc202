"""shardwise.planner: which tensor, pipeline and data-parallel degrees to use, and why.

Pure Python (no torch; matplotlib only inside :func:`shardwise.planner.plot.plot_candidates`).
Modules, bottom up:

- ``models`` / ``model_catalog``: transformer shapes and parameter counts, HF ``config.json`` reader
- ``gpus``: accelerator catalog and the links between GPUs (NVLink, PCIe, network)
- ``calibration``: measured collective figures (JSON schema, nccl-tests ``busbw``)
- ``memory``: bytes per GPU (weights, gradients, Adam, activations, KV cache)
- ``timing``: seconds per training step, time to first token and per output token
- ``search``: enumerate (tp, pp, dp, micro-batch), evaluate, reject, rank
- ``report`` / ``plot`` / ``cli``: text, JSON and PNG output, ``shardwise plan``

This ``__init__`` imports nothing so that ``import shardwise.planner`` stays cheap.
"""
