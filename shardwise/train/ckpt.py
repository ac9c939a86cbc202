"""Training checkpoints: per-rank shards named by HF tensor rows, written atomically.

Layout of ``ROOT/step_00000010/``::

    meta.json                 step, layout (tp, pp, dp), model config (HF config.json), files
    shard-pp{p}-tp{t}.pt      written by the dp_rank 0 rank of (p, t): for every local parameter,
                              (HF tensor name, Piece or None, {"param", "exp_avg", "exp_avg_sq"})
    rng-{rank}.pt             each rank's RNG tracker state

``ROOT/latest`` names the newest complete step directory. A save writes ``step_N.tmp/``; after a
barrier (every shard on disk) rank 0 writes meta.json, renames the directory to ``step_N``, points
``latest`` at it (write + ``os.replace``), and only then deletes older steps. A rank killed
mid-save leaves a ``.tmp`` directory that nothing reads; ``latest`` still names the previous one.

Shards are addressed by rows of the *full* HF-named tensors (``shardwise.shards``), so a
checkpoint loads at any (tp, pp, dp): :class:`CheckpointReader` assembles full tensors from
whichever shards hold their rows and each rank takes its own rows. This resharding-on-load is
also what :func:`export_hf` (full tensors -> safetensors) and :func:`reshard` use.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..shards import Piece, assemble_local, full_name, pieces_of, sharded_params

KINDS = ("param", "exp_avg", "exp_avg_sq")


def find_checkpoint(path: str | Path) -> Path:
    """The step directory ``path`` names: itself (has meta.json) or ``path/latest``'s target."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    latest = p / "latest"
    if latest.is_file():
        step_dir = p / latest.read_text().strip()
        if (step_dir / "meta.json").is_file():
            return step_dir
        raise FileNotFoundError(f"{latest} names {step_dir}, which has no meta.json")
    raise FileNotFoundError(f"no complete checkpoint at {p}: expected meta.json or a 'latest' file")


def _split(param: nn.Parameter, path: str, t: torch.Tensor) -> list[tuple[str, Piece | None, torch.Tensor]]:
    """``t`` (shaped like ``param``) cut into its pieces' rows, padding dropped."""
    pieces = pieces_of(param)
    if not pieces:
        return [(path, None, t)]
    out, offset = [], 0
    for pc in pieces:
        out.append((full_name(path, pc.key), pc, t.narrow(pc.dim, offset, pc.stop - pc.start)))
        offset += pc.length
    return out


def shard_state(model: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """This rank's parameters and AdamW moments, addressed by HF tensor rows."""
    entries: dict[tuple[str, tuple | None], dict[str, torch.Tensor]] = {}
    steps = []
    for path, p, _ in sharded_params(model):
        state = opt.state.get(p, {}) if opt is not None else {}
        tensors = {"param": p.detach()}
        for k in ("exp_avg", "exp_avg_sq"):
            if k in state:
                tensors[k] = state[k]
        if "step" in state:
            steps.append(float(state["step"]))
        for kind, t in tensors.items():
            for name, pc, rows in _split(p, path, t):
                key = (name, None if pc is None else (pc.dim, pc.start, pc.stop, pc.full))
                entries.setdefault(key, {})[kind] = rows.clone()
    return {"entries": [(n, pc, ts) for (n, pc), ts in entries.items()],
            "opt_step": max(steps) if steps else 0.0}


class CheckpointReader:
    """Full tensors assembled from every shard of a step directory (loaded lazily, cached)."""

    def __init__(self, step_dir: str | Path) -> None:
        self.dir = find_checkpoint(step_dir)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.index: dict[tuple[str, str], list[tuple[tuple | None, torch.Tensor]]] = {}
        self.opt_step = 0.0
        for f in self.meta["files"]:
            shard = torch.load(self.dir / f, map_location="cpu", weights_only=True)
            self.opt_step = max(self.opt_step, shard["opt_step"])
            for name, pc, tensors in shard["entries"]:
                for kind, rows in tensors.items():
                    self.index.setdefault((kind, name), []).append((pc, rows))
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def names(self, kind: str = "param") -> list[str]:
        return sorted(n for k, n in self.index if k == kind)

    def full(self, kind: str, name: str) -> torch.Tensor:
        key = (kind, name)
        if key in self._cache:
            return self._cache[key]
        if key not in self.index:
            raise KeyError(f"tensor {name!r} ({kind}) is missing from checkpoint {self.dir}")
        parts = self.index[key]
        if parts[0][0] is None:
            full = parts[0][1]
        else:
            dim, _, _, size = parts[0][0]
            shape = list(parts[0][1].shape)
            shape[dim] = size
            full = torch.empty(shape, dtype=parts[0][1].dtype)
            covered = torch.zeros(size, dtype=torch.bool)
            for (d, start, stop, _), rows in parts:
                full.narrow(d, start, stop - start).copy_(rows)
                covered[start:stop] = True
            if not bool(covered.all()):
                raise ValueError(f"checkpoint {self.dir} lacks rows of {name!r} "
                                 f"({int((~covered).sum())} of {size} missing)")
        self._cache[key] = full
        return full

    def reader(self, kind: str) -> Callable[[str, tuple, int, int, int], torch.Tensor]:
        def read(name: str, shape: tuple, dim: int, start: int, stop: int) -> torch.Tensor:
            full = self.full(kind, name)
            if tuple(full.shape) != tuple(shape):
                raise ValueError(f"{name!r} has shape {tuple(full.shape)} in the checkpoint but "
                                 f"the model expects {tuple(shape)}: a different model config")
            return full.narrow(dim, start, stop - start) if full.dim() else full
        return read


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: str | Path, step: int, model: nn.Module, opt: torch.optim.Optimizer,
                    mesh, *, meta: dict[str, Any], rng: dict[str, torch.Tensor] | None = None,
                    crash: bool = False) -> Path:
    """Collective: every rank calls it. Returns the final step directory."""
    root = Path(root)
    name = f"step_{step:08d}"
    tmp = root / f"{name}.tmp"
    if mesh.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    p, _, t = mesh.coords
    if mesh.dp_rank == 0:
        f = tmp / f"shard-pp{p}-tp{t}.pt"
        torch.save(shard_state(model, opt), f.with_suffix(".part"))
        os.replace(f.with_suffix(".part"), f)
    if rng is not None:
        torch.save(rng, tmp / f"rng-{mesh.rank}.pt")
    if crash and mesh.rank == mesh.world_size - 1:
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die with the save half done
    _barrier()
    final = root / name
    if mesh.rank == 0:
        files = [f"shard-pp{a}-tp{b}.pt" for a in range(mesh.pp) for b in range(mesh.tp)]
        missing = [f for f in files if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(f"checkpoint {tmp} is missing {missing}")
        full_meta = dict(meta, step=step, layout={"tp": mesh.tp, "pp": mesh.pp, "dp": mesh.dp},
                         files=files)
        (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (root / "latest.part").write_text(name)
        os.replace(root / "latest.part", root / "latest")
        for old in root.glob("step_*"):
            if old.name != name and not old.name.endswith(".tmp"):
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


@torch.no_grad()
def load_checkpoint(path: str | Path, model: nn.Module, opt: torch.optim.Optimizer | None,
                    mesh) -> dict[str, Any]:
    """Fill ``model`` (and ``opt``'s AdamW moments) with this rank's rows, at any layout.
    Restores RNG state when the layout is the one saved. Returns the checkpoint's meta."""
    ck = CheckpointReader(path)
    for path_, p, _ in sharded_params(model):
        p.copy_(assemble_local(path_, p, ck.reader("param")).to(p.dtype))
        if opt is not None and ck.opt_step > 0:
            opt.state[p] = {"step": torch.tensor(ck.opt_step),
                            **{k: assemble_local(path_, p, ck.reader(k)).to(p.dtype).clone()
                               for k in ("exp_avg", "exp_avg_sq")}}
    rng_file = ck.dir / f"rng-{mesh.rank}.pt"
    same = ck.meta["layout"] == {"tp": mesh.tp, "pp": mesh.pp, "dp": mesh.dp}
    ck.meta["rng"] = torch.load(rng_file, weights_only=True) if same and rng_file.is_file() else None
    return ck.meta
