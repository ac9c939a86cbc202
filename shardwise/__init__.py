"""shardwise: tensor parallelism for PyTorch that you can read, run on a laptop CPU, and deploy.

Imports are lazy so that the torch-free parts (the planner) load without torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_LAZY = {"Mesh": "shardwise.mesh", "Partition": "shardwise.partition",
         "HeadLayout": "shardwise.partition", "split_sizes": "shardwise.partition",
         "vocab_partition": "shardwise.partition"}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shardwise' has no attribute {name!r}")
