"""Start a training run: resolve, validate, tokenize in the launching process, then run the
workers (spawned locally, or this process itself under torchrun)."""
from __future__ import annotations

from typing import Any

from ..checkpoint.source import ModelSource, resolve
from ..mesh import launch_env, under_launcher
from .config import TrainConfig, validate
from .data import PackedData, tokenize_files


def prepare(cfg: TrainConfig) -> tuple[ModelSource, PackedData]:
    """Everything that can fail on bad input, before any worker starts."""
    source = cfg.model if isinstance(cfg.model, ModelSource) else resolve(cfg.model)
    world = launch_env().world if under_launcher() else None
    validate(cfg, source, world=world)
    data = PackedData.from_stream(tokenize_files(cfg.data, source), cfg.seq_len, seed=cfg.seed)
    return source, data


def train(cfg: TrainConfig, *,
          prepared: tuple[ModelSource, PackedData] | None = None) -> dict[str, Any]:
    """Run training; returns rank 0's result (``losses``, ``steps``, ``records``, ``plot``).
    ``prepared``: what :func:`prepare` returned for ``cfg`` (the CLI prepares while checking)."""
    from .loop import train_worker
    source, data = prepared or prepare(cfg)
    if under_launcher() or cfg.world == 1:
        return train_worker(cfg, source, data.rows)
    from ..launch import spawn
    return spawn(train_worker, cfg.world, cfg, source, data.rows)[0]
