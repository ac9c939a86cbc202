"""Read the two formats that came before :mod:`shardwise.checkpoint.sharded`, so that old
directories still load (``--model``, ``--resume``, ``shardwise convert --from``); ``shardwise
convert --from OLD --out NEW`` rewrites one in the current format.

* format 1 (``shardwise convert --model``): ``shardwise.json`` ``{"format": 1, "tp", "pieces":
  {rank: {param: [piece, ...]}}}``, ``config.json``, ``rank-NNN.safetensors`` by parameter name;
* the first training format: ``meta.json`` (step, layout, HF config, files), ``shard-pp{p}-tp{t}.pt``
  holding ``(HF name, (dim, start, stop, full) or None, {kind: rows})`` and ``rng-{rank}.pt``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ..shards import Piece, split_local
from .sharded import Entry, has_tokenizer


def _fixed(t: torch.Tensor) -> Callable:
    def load(rows=None) -> torch.Tensor:
        if rows is None:
            return t
        dim, a, b = rows
        return t.narrow(dim, a, b - a)
    return load


def _entry(kind: str, name: str, pc: Piece | None, rows: torch.Tensor) -> Entry:
    if pc is None:
        return Entry(kind, name, tuple(rows.shape), None, 0, 0, None, _fixed(rows))
    shape = list(rows.shape)
    shape[pc.dim] = pc.full
    return Entry(kind, name, tuple(shape), pc.dim, pc.start, pc.stop, None, _fixed(rows))


def read_legacy(d: Path, meta: dict | None) -> tuple[dict, list[Entry], Callable]:
    """``(normalised meta, entries, rng(rank))`` of an older checkpoint directory."""
    if meta is not None and meta.get("format") == 1:
        return _format1(d, meta)
    if (d / "meta.json").is_file():
        return _train_v1(d, json.loads((d / "meta.json").read_text()))
    raise ValueError(f"{d} holds a checkpoint format this version cannot read "
                     f"(format {meta.get('format') if meta else None!r}): use the shardwise "
                     "version that wrote it to `shardwise convert` it")


def _format1(d: Path, meta: dict) -> tuple[dict, list[Entry], Callable]:
    from safetensors.torch import load_file
    entries = []
    for rank in range(meta["tp"]):
        for name, t in load_file(str(d / f"rank-{rank:03d}.safetensors")).items():
            pcs = meta["pieces"][str(rank)].get(name)
            if pcs:
                t.pieces = [Piece(**p) for p in pcs]
            entries += [_entry("param", n, pc, rows) for n, pc, rows in split_local(name, t)]
    config = json.loads((d / "config.json").read_text())
    norm = {"format": 1, "kind": "model", "layout": {"tp": meta["tp"], "pp": 1, "dp": 1, "zero": 0},
            "config": config, "tokenizer": str(d) if has_tokenizer(d) else None}
    return norm, entries, lambda rank: None


def _train_v1(d: Path, meta: dict) -> tuple[dict, list[Entry], Callable]:
    entries, opt_step = [], 0.0
    for f in meta["files"]:
        shard = torch.load(d / f, map_location="cpu", weights_only=True)
        opt_step = max(opt_step, float(shard["opt_step"]))
        for name, pc, tensors in shard["entries"]:
            piece = None if pc is None else Piece("", pc[0], pc[1], pc[2], pc[3])
            entries += [_entry(kind, name, piece, rows) for kind, rows in tensors.items()]
    norm = dict(meta, format="train-1", kind="train",
                layout=dict(meta["layout"], zero=0), opt_step=opt_step)

    def rng(rank: int) -> dict[str, torch.Tensor] | None:
        f = d / f"rng-{rank}.pt"
        return torch.load(f, weights_only=True) if f.is_file() else None
    return norm, entries, rng
