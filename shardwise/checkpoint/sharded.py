"""The one sharded checkpoint format, for models (``shardwise convert --model``) and training runs
(``shardwise train``) alike. A directory::

    shardwise.json       {"format": 2, "kind": "model" | "train", "layout": {tp, pp, dp, zero},
                          "dtype", "files": {file: {rank, pp, dp, tp}}, "step", "model", ...}
    config.json          the model's Hugging Face config
    tokenizer files      copied from the model's source (TOKENIZER_FILES)
    shard-pp{p}-dp{d}-tp{t}.safetensors   what rank (p, d, t) holds

Tensors are addressed by rows of the *full* Hugging Face tensors, so a checkpoint loads at any
layout. A file's tensor ``"{kind}/{HF name}"`` (kind ``param``, ``exp_avg``, ``exp_avg_sq``;
``rng/{state}`` for the rank's RNG states) is described in the file's header metadata by its piece
``{"shape": full shape, "dim", "start", "stop"}``: rows ``[start, stop)`` of the full tensor along
``dim`` (``dim`` null: the whole tensor; ``"name"``: the tensor when the key carries a ``#start``
suffix, for a second piece of one tensor in one file), optionally ``"flat": [a, b]``: only elements ``[a, b)`` of
that block, flattened row-major (a ZeRO shard of optimizer state). Pieces may overlap (a KV head
replicated on two TP ranks is written by both); vocabulary padding is never written. A quantized
model (``"quant"`` in the metadata) stores each quantized weight as ``qweight``, ``qscale`` and
``qzero`` pieces instead of ``param`` (:mod:`.qsharded`).

Why not ``torch.distributed.checkpoint`` (DCP): a DCP tensor is a set of rectangular chunks that
must not overlap and must cover it exactly (``default_planner._validate_global_plan``). shardwise's
pieces are rows of fused tensors, may overlap (replicated KV heads), exclude padding rows and, under
ZeRO, are flat element ranges of a row block: not boxes. Safetensors files (no pickle, memory
mapped, readable by every HF tool) plus this piece table express all of them.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..shards import Piece, ReadFn, split_flat, split_local

FORMAT = 2
META = "shardwise.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")
KINDS = ("param", "exp_avg", "exp_avg_sq")


def copy_tokenizer(src: str | Path | None, dst: Path) -> None:
    """Copy the tokenizer files (TOKENIZER_FILES) that ``src`` has into ``dst``."""
    if src is None or not Path(src).is_dir():
        return
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)


def has_tokenizer(d: str | Path) -> bool:
    return any((Path(d) / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                    "tokenizer_config.json"))


def shard_file(pp: int, dp: int, tp: int) -> str:
    return f"shard-pp{pp}-dp{dp}-tp{tp}.safetensors"


# ----------------------------------------------------------------------------------- writing

def pieces_of_tensor(kind: str, path: str, param: torch.Tensor, value: torch.Tensor,
                     flat: tuple[int, int] | None = None) -> Iterator[tuple[str, dict, torch.Tensor]]:
    """``(key, piece metadata, tensor)`` for ``value``: shaped like ``param`` (``flat`` None) or the
    flat elements ``[lo, hi)`` of it (a ZeRO shard). Padding rows are dropped. A parameter with
    several pieces of one tensor (Phi-3's fused ``qkv_proj``: its q, k and v rows) keys the later
    ones ``{kind}/{name}#{start}``, their metadata naming the tensor."""
    seen: set[str] = set()

    def key(name: str, meta: dict) -> str:
        k = f"{kind}/{name}"
        if k in seen:
            k, meta["name"] = f"{k}#{meta['start']}", name
        seen.add(k)
        return k

    if flat is None:
        for name, pc, rows in split_local(path, _with_pieces(value, param)):
            meta = _piece_meta(param, pc)
            yield key(name, meta), meta, rows
        return
    lo, hi = flat
    for name, pc, a, b, i, j in split_flat(path, param, lo, hi):
        meta = dict(_piece_meta(param, pc), flat=[a, b])
        yield key(name, meta), meta, value[i - lo:j - lo]


def _with_pieces(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if getattr(param, "pieces", None) and value is not param:
        value = value.detach()
        value.pieces = param.pieces
    return value


def _piece_meta(param: torch.Tensor, pc: Piece | None) -> dict:
    if pc is None:
        return {"shape": list(param.shape), "dim": None, "start": 0, "stop": 0}
    shape = list(param.shape)
    shape[pc.dim] = pc.full
    return {"shape": shape, "dim": pc.dim, "start": pc.start, "stop": pc.stop}


def write_file(path: Path, items: list[tuple[str, dict, torch.Tensor]]) -> None:
    """One rank's safetensors file: the tensors and, in the header, their pieces."""
    from safetensors.torch import save_file
    tensors, pieces = {}, {}
    for key, meta, t in items:
        if key in tensors:
            raise ValueError(f"{path.name}: {key} written twice")
        tensors[key] = t.detach().contiguous().cpu()
        pieces[key] = meta
    save_file(tensors, str(path), metadata={"shardwise": json.dumps(pieces)})


def write_meta(d: Path, meta: dict[str, Any], config: dict, tokenizer: str | Path | None) -> None:
    """``shardwise.json``, ``config.json`` and the tokenizer files of checkpoint directory ``d``."""
    (d / META).write_text(json.dumps(dict(meta, format=FORMAT), indent=1))
    (d / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer(tokenizer, d)


# ----------------------------------------------------------------------------------- reading

@dataclass
class Entry:
    """One stored piece: rows ``[start, stop)`` of the full tensor along ``dim`` (None: all),
    optionally only its flat elements ``flat``; ``load(rows)`` reads it (rows: a sub-range along
    ``dim``, only without ``flat``)."""

    kind: str
    name: str
    shape: tuple[int, ...]
    dim: int | None
    start: int
    stop: int
    flat: tuple[int, int] | None
    load: Callable[[tuple[int, int] | None], torch.Tensor]
    info: dict = field(default_factory=dict)  # other keys of the piece (quantized: method, group)


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory ``path`` names: itself, or the step its ``latest`` file names."""
    p = Path(path)
    if is_checkpoint_dir(p):
        return p
    latest = p / "latest"
    if latest.is_file():
        step_dir = p / latest.read_text().strip()
        if is_checkpoint_dir(step_dir):
            return step_dir
        raise FileNotFoundError(f"{latest} names {step_dir}, which is not a complete checkpoint")
    raise FileNotFoundError(f"no complete checkpoint at {p}: expected {META} or a 'latest' file")


def checkpoint_kind(path: str | Path) -> str:
    """``"model"`` or ``"train"`` (from the metadata alone, any format version)."""
    d = find_checkpoint(path)
    if (d / META).is_file():
        meta = json.loads((d / META).read_text())
        return meta.get("kind", "model") if meta.get("format") == FORMAT else "model"
    return "train"


def is_checkpoint_dir(p: Path) -> bool:
    return (p / META).is_file() or (p / "meta.json").is_file()


def is_checkpoint(path: str | Path) -> bool:
    """A sharded checkpoint (this format or an older one), or a run's root with ``latest``."""
    p = Path(path)
    return p.is_dir() and (is_checkpoint_dir(p) or (p / "latest").is_file())


class Checkpoint:
    """Read a sharded checkpoint (any format version) at any layout.

    ``meta``: the normalised metadata (kind, layout, step, model, config, ...); ``config``: the HF
    config dict; ``reader(kind)``: a :data:`~shardwise.shards.ReadFn` over full tensors, reading
    only the stored rows it needs when one piece covers them; ``full(kind, name)``: a whole tensor.
    """

    def __init__(self, path: str | Path) -> None:
        self.dir = find_checkpoint(path)
        meta = json.loads((self.dir / META).read_text()) if (self.dir / META).is_file() else None
        if meta is not None and meta.get("format") == FORMAT:
            self.meta, self.entries, self._rng = _read_v2(self.dir, meta)
        else:
            from .legacy import read_legacy
            self.meta, self.entries, self._rng = read_legacy(self.dir, meta)
        self.index: dict[tuple[str, str], list[Entry]] = {}
        for e in self.entries:
            self.index.setdefault((e.kind, e.name), []).append(e)
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    @property
    def config(self) -> dict:
        return self.meta["config"]

    @property
    def layout(self) -> dict[str, int]:
        return self.meta["layout"]

    def names(self, kind: str = "param") -> list[str]:
        return sorted(n for k, n in self.index if k == kind)

    def has(self, kind: str) -> bool:
        return any(k == kind for k, _ in self.index)

    def rng(self, rank: int) -> dict[str, torch.Tensor] | None:
        """Rank ``rank``'s RNG states as saved (None when it saved none)."""
        return self._rng(rank)

    def full(self, kind: str, name: str) -> torch.Tensor:
        key = (kind, name)
        if key not in self._cache:
            if key not in self.index:
                raise KeyError(f"tensor {name!r} ({kind}) is missing from checkpoint {self.dir}")
            self._cache[key] = _assemble(self.index[key], self.dir)
        return self._cache[key]

    def reader(self, kind: str) -> ReadFn:
        def read(name: str, shape: tuple, dim: int, start: int, stop: int) -> torch.Tensor:
            parts = self.index.get((kind, name))
            if not parts:
                raise KeyError(f"tensor {name!r} ({kind}) is missing from checkpoint {self.dir}")
            if tuple(parts[0].shape) != tuple(shape):
                raise ValueError(f"{name!r} has shape {tuple(parts[0].shape)} in checkpoint "
                                 f"{self.dir} but the model expects {tuple(shape)}: a different "
                                 "model config")
            if not shape:
                return self.full(kind, name)
            for e in parts:  # one stored piece covers the rows: read just those
                if e.flat is None and (e.dim is None or (e.dim == dim and e.start <= start
                                                         and stop <= e.stop)):
                    off = 0 if e.dim is None else e.start
                    return e.load((dim, start - off, stop - off))
            return self.full(kind, name).narrow(dim, start, stop - start)
        return read


def _read_v2(d: Path, meta: dict) -> tuple[dict, list[Entry], Callable]:
    from safetensors import safe_open
    entries: list[Entry] = []
    rng_keys: dict[int, tuple[Path, list[str]]] = {}
    for fname, coords in meta["files"].items():
        path = d / fname
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {d} lacks {fname}")
        with safe_open(str(path), "pt") as f:
            pieces = json.loads((f.metadata() or {}).get("shardwise", "{}"))
        for key, pc in pieces.items():
            kind, name = key.split("/", 1)
            name = pc.get("name", name)
            if kind == "rng":
                rng_keys.setdefault(coords["rank"], (path, []))[1].append(key)
                continue
            flat = tuple(pc["flat"]) if pc.get("flat") else None
            info = {k: v for k, v in pc.items()
                    if k not in ("shape", "dim", "start", "stop", "flat")}
            entries.append(Entry(kind, name, tuple(pc["shape"]), pc["dim"], pc["start"],
                                 pc["stop"], flat, _loader(path, key), info))

    meta = dict(meta, config=json.loads((d / "config.json").read_text()))

    def rng(rank: int) -> dict[str, torch.Tensor] | None:
        if rank not in rng_keys:
            return None
        path, keys = rng_keys[rank]
        with safe_open(str(path), "pt") as f:
            return {k.split("/", 1)[1]: f.get_tensor(k) for k in keys}
    return meta, entries, rng


def _loader(path: Path, key: str) -> Callable[[tuple[int, int, int] | None], torch.Tensor]:
    def load(rows: tuple[int, int, int] | None = None) -> torch.Tensor:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            if rows is None:
                return f.get_tensor(key)
            dim, a, b = rows
            return f.get_slice(key)[(slice(None),) * dim + (slice(a, b),)]
    return load


def _assemble(parts: list[Entry], where: Path) -> torch.Tensor:
    """The full tensor from its stored pieces (whole blocks and flat ranges of blocks)."""
    shape = tuple(parts[0].shape)
    for e in parts:
        if e.dim is None and e.flat is None:
            return e.load(None)
    first = parts[0].load(None)
    full = torch.empty(shape, dtype=first.dtype)
    covered = torch.zeros(shape, dtype=torch.bool)
    blocks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for e in parts:
        dim = 0 if e.dim is None else e.dim
        start, stop = (0, shape[0]) if e.dim is None else (e.start, e.stop)
        data = first if e is parts[0] else e.load(None)
        if e.flat is None:
            full.narrow(dim, start, stop - start).copy_(data)
            covered.narrow(dim, start, stop - start).fill_(True)
            continue
        bshape = list(shape)
        bshape[dim] = stop - start
        key = (dim, start, stop)
        if key not in blocks:
            n = int(torch.Size(bshape).numel())
            blocks[key] = (torch.empty(n, dtype=data.dtype), torch.zeros(n, dtype=torch.bool))
        buf, cov = blocks[key]
        buf[e.flat[0]:e.flat[1]] = data.reshape(-1)
        cov[e.flat[0]:e.flat[1]] = True
    for (dim, start, stop), (buf, cov) in blocks.items():
        bshape = list(shape)
        bshape[dim] = stop - start
        full.narrow(dim, start, stop - start).copy_(buf.view(bshape))  # (block rows, ...)
        covered.narrow(dim, start, stop - start).logical_or_(cov.view(bshape))
    if not bool(covered.all()):
        raise ValueError(f"checkpoint {where} lacks part of {parts[0].kind} {parts[0].name!r} "
                         f"({int((~covered).sum())} of {covered.numel()} elements missing)")
    return full


@torch.no_grad()
def load_model(model: torch.nn.Module, path: str | Path) -> Checkpoint:
    """Fill every parameter of ``model`` (any tp, any pipeline stage) with its rows."""
    from ..shards import assemble_local, sharded_params
    ck = Checkpoint(path)
    read = ck.reader("param")
    for name, p, _ in sharded_params(model):
        p.copy_(assemble_local(name, p, read).to(p.dtype))
    return ck
