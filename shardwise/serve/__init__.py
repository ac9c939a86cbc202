"""Tensor-parallel serving: continuous batching over a paged KV cache behind an OpenAI-compatible
HTTP server.

* :mod:`.scheduler` (rank 0) picks each step's tokens; :mod:`.kv` holds the paged cache and its
  attention; :mod:`.engine` runs the TP worker processes;
* :mod:`.client`, :mod:`.server`, :mod:`.protocol`, :mod:`.text`, :mod:`.metrics` are the HTTP side;
* :mod:`.cli`: ``shardwise serve`` and ``shardwise bench serve``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["EngineConfig"]


def __getattr__(name: str) -> Any:  # lazy: ``python -m shardwise.serve --help`` needs no torch
    if name == "EngineConfig":
        from .engine import EngineConfig
        return EngineConfig
    raise AttributeError(f"module 'shardwise.serve' has no attribute {name!r}")
