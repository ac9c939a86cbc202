"""Training checkpoints in the one sharded format (:mod:`shardwise.checkpoint.sharded`).

``ROOT/step_00000010/`` is a complete checkpoint directory (``kind: "train"``): parameters
(written by DP rank 0 of each (pp, tp) coordinate), AdamW moments (the same ranks; under ZeRO
every DP rank its own flat slices), each rank's RNG states, the step and layout in
``shardwise.json``, ``config.json`` and the tokenizer files. ``ROOT/latest`` names the newest one.

A save stages ``step_N.tmp/``; after a barrier (every rank's file on disk) rank 0 writes the
metadata, renames the directory into place, points ``latest`` at it and only then deletes older
steps. A rank killed mid-save leaves a ``.tmp`` directory that nothing reads; ``latest`` still
names the previous step. Loading works at any (tp, pp, dp, zero): each rank reads its rows of the
full tensors (the RNG states only when the layout is the one saved).
"""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.atomic import publish, staging_dir, write_text
from ..checkpoint.sharded import (load_model, pieces_of_tensor, shard_file, write_file,
                                  write_meta)
from ..shards import sharded_params


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: str | Path, step: int, model: nn.Module, opt, mesh, *,
                    meta: dict[str, Any], config: dict, tokenizer: str | Path | None,
                    rng: dict[str, torch.Tensor] | None = None, crash: bool = False) -> Path:
    """Collective: every rank calls it. ``opt``: a ReplicatedAdamW or ZeroAdamW. Returns the
    published step directory."""
    root = Path(root)
    name = f"step_{step:08d}"
    target = root / name
    staging = root / f"{name}.tmp"
    if mesh.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        staging_dir(target)
    _barrier()
    p, d, t = mesh.coords
    items = []
    if d == 0:
        for path, param, _ in sharded_params(model):
            items += pieces_of_tensor("param", path, param, param)
    if opt.writes_state():
        for kind, path, param, flat, value in opt.state_items():
            items += pieces_of_tensor(kind, path, param, value, flat)
    for k, v in (rng or {}).items():
        items.append((f"rng/{k}", {"shape": list(v.shape), "dim": None, "start": 0, "stop": 0}, v))
    write_file(staging / shard_file(p, d, t), items)
    if crash and mesh.rank == mesh.world_size - 1:
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die with the save half done
    _barrier()
    if mesh.rank == 0:
        files = {}
        for r in range(mesh.world_size):
            c = (r // (mesh.dp * mesh.tp), (r // mesh.tp) % mesh.dp, r % mesh.tp)
            files[shard_file(*c)] = {"rank": r, "pp": c[0], "dp": c[1], "tp": c[2]}
        missing = [f for f in files if not (staging / f).is_file()]
        if missing:
            raise RuntimeError(f"checkpoint {staging} is missing {missing}")
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        layout = {"tp": mesh.tp, "pp": mesh.pp, "dp": mesh.dp, "zero": opt.zero}
        write_meta(staging, dict(meta, kind="train", step=step, layout=layout, files=files,
                                 dtype=dtype, opt_step=opt.opt_step), config, tokenizer)
        publish(staging, target)
        write_text(root / "latest", name)
        for old in root.glob("step_*"):
            if old.name != name and not old.name.endswith(".tmp"):
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return target


def load_checkpoint(path: str | Path, model: nn.Module, opt, mesh) -> dict[str, Any]:
    """Fill ``model`` and ``opt`` with this rank's rows, at any layout. Returns the checkpoint's
    meta with ``"rng"``: this rank's RNG states when the layout is the one saved, else None."""
    ck = load_model(model, path)
    step = float(ck.meta.get("opt_step", 0.0))
    if opt is not None and step > 0 and ck.has("exp_avg"):
        opt.load_state(ck.reader, step)
    saved = {k: ck.layout[k] for k in ("tp", "pp", "dp")}
    same = saved == {"tp": mesh.tp, "pp": mesh.pp, "dp": mesh.dp}
    return dict(ck.meta, rng=ck.rng(mesh.rank) if same else None)
