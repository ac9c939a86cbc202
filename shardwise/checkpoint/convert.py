"""Tensor-parallel checkpoints: save each rank's shard, merge into a Hugging Face directory,
reshard to another tp; and ``shardwise convert``.

A sharded checkpoint is a directory::

    config.json            the model's HF config
    shardwise.json         {"format": 1, "tp": t, "pieces": {rank: {param: [piece, ...]}}}
    rank-000.safetensors   rank 0's local tensors, by our parameter names
    ...                    (tokenizer files copied alongside when known)

Every write goes to a temporary directory next to the target and is renamed into place only
when complete; an existing checkpoint is replaced only after the new one is whole, so a save
killed at any moment leaves the previous checkpoint loadable.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..mesh import LayoutOnly, group_rank, group_size
from ..shards import Piece, assemble_local, split_local

META = "shardwise.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")


def _pieces_json(p: torch.Tensor) -> list[dict] | None:
    pcs = getattr(p, "pieces", None)
    return [dataclasses.asdict(x) for x in pcs] if pcs else None


def atomic_dir(target: Path, fill) -> Path:
    """Create ``target`` by ``fill(tmp_dir)`` then rename; replace an old one only at the end."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _copy_tokenizer(src: Path | None, dst: Path) -> None:
    if src is None:
        return
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, dst / name)


def save_sharded(model, directory: str | Path, *, group=None, tokenizer_dir: Path | None = None) -> None:
    """Every rank of ``group`` writes its shard; rank 0 writes the metadata and publishes the
    directory. Collective: all ranks of the group must call it."""
    from safetensors.torch import save_file
    import torch.distributed as dist

    rank, tp = group_rank(group), group_size(group)
    target = Path(directory)
    staging = target.parent / f".{target.name}.staging"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    if tp > 1:
        dist.barrier(group=group)
    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()}
    save_file(tensors, str(staging / f"rank-{rank:03d}.safetensors"))
    pieces = {n: _pieces_json(p) for n, p in model.named_parameters()}
    gathered = [None] * tp
    if tp > 1:
        dist.all_gather_object(gathered, pieces, group=group)
    else:
        gathered = [pieces]
    if rank == 0:
        def fill(tmp: Path) -> None:
            for f in staging.iterdir():
                shutil.move(str(f), tmp / f.name)
            (tmp / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
            (tmp / META).write_text(json.dumps({"format": 1, "tp": tp, "pieces": {
                str(r): gathered[r] for r in range(tp)}}))
            _copy_tokenizer(tokenizer_dir, tmp)
        atomic_dir(target, fill)
        shutil.rmtree(staging, ignore_errors=True)
    if tp > 1:
        dist.barrier(group=group)


def read_sharded(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config dict, full HF-named tensors)`` merged from every rank's shard."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / META).exists():
        raise FileNotFoundError(f"{d} is not a shardwise sharded checkpoint (no {META})")
    meta = json.loads((d / META).read_text())
    full: dict[str, torch.Tensor] = {}
    for rank in range(meta["tp"]):
        local = load_file(str(d / f"rank-{rank:03d}.safetensors"))
        for name, t in local.items():
            pcs = meta["pieces"][str(rank)].get(name)
            if pcs:
                t.pieces = [Piece(**p) for p in pcs]
            for fname, pc, rows in split_local(name, t):
                if pc is None:
                    full.setdefault(fname, rows)
                    continue
                shape = list(rows.shape)
                shape[pc.dim] = pc.full
                buf = full.setdefault(fname, torch.zeros(shape, dtype=rows.dtype))
                buf.narrow(pc.dim, pc.start, pc.stop - pc.start).copy_(rows)
    return json.loads((d / "config.json").read_text()), full


def merge_to_hf(directory: str | Path, out: str | Path) -> Path:
    """Write an HF directory (config.json + model.safetensors + tokenizer) that transformers
    loads; vocabulary padding is dropped (it lives outside every piece's rows)."""
    from safetensors.torch import save_file

    cfg, full = read_sharded(directory)

    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in full.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        _copy_tokenizer(Path(directory), tmp)
    return atomic_dir(Path(out), fill)


def reshard(directory: str | Path, out: str | Path, tp: int) -> Path:
    """Re-slice a sharded checkpoint for ``tp`` ranks, in one process (no process group)."""
    from safetensors.torch import save_file
    from ..models.config import LlamaConfig
    from ..models.llama import LlamaForCausalLM

    cfg_dict, full = read_sharded(directory)
    cfg = LlamaConfig.from_hf(cfg_dict)

    def read(name, shape, dim, start, stop):
        t = full[name]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} in the checkpoint, {shape} expected")
        return t.narrow(dim, start, stop - start) if t.dim() else t

    def fill(tmp: Path) -> None:
        pieces = {}
        for rank in range(tp):
            model = LlamaForCausalLM(cfg, group=LayoutOnly(tp, rank), device="meta")
            tensors = {n: assemble_local(n, p, read).contiguous()
                       for n, p in model.named_parameters()}
            save_file(tensors, str(tmp / f"rank-{rank:03d}.safetensors"))
            pieces[str(rank)] = {n: _pieces_json(p) for n, p in model.named_parameters()}
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2))
        (tmp / META).write_text(json.dumps({"format": 1, "tp": tp, "pieces": pieces}))
        _copy_tokenizer(Path(directory), tmp)
    return atomic_dir(Path(out), fill)


def load_sharded(model, directory: str | Path) -> None:
    """Load a sharded checkpoint saved at the same tp into this rank's ``model``."""
    from safetensors.torch import load_file

    d = Path(directory)
    meta = json.loads((d / META).read_text())
    tp, rank = group_size(model.group), group_rank(model.group)
    if meta["tp"] != tp:
        raise ValueError(f"checkpoint {d} was saved at tp={meta['tp']} but the model runs at "
                         f"tp={tp}: reshard it first (shardwise convert --from {d} --tp {tp})")
    local = load_file(str(d / f"rank-{rank:03d}.safetensors"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(local[n])


# ---------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="save: a model (preset, HF dir, .gguf) to shard at --tp")
    p.add_argument("--from", dest="src", help="a sharded checkpoint to merge or reshard")
    from ..usage import int_range
    p.add_argument("--tp", type=int_range(1), help="tensor-parallel size of the output shards")
    p.add_argument("--pp", type=int_range(1), default=None,
                   help="training checkpoints: pipeline stages")
    p.add_argument("--dp", type=int_range(1), default=None,
                   help="training checkpoints: data-parallel size")
    p.add_argument("--to-hf", help="merge --from into this HF directory")
    p.add_argument("--out", help="output sharded checkpoint directory")


def _save_worker(model_spec: str, tp: int, out: str) -> None:
    from ..mesh import Mesh
    from .source import build_model, resolve
    mesh = Mesh.init(tp=tp)
    src = resolve(model_spec)
    model = build_model(src, group=mesh.tp_group)
    save_sharded(model, out, group=mesh.tp_group, tokenizer_dir=src.tokenizer)


def _convert_training(src: Path, args: argparse.Namespace) -> int:
    from ..train.ckpt import find_checkpoint
    from ..train.convert import export_hf, reshard as reshard_training
    step_dir = find_checkpoint(src)  # raises with what it expected when src is neither format
    if args.to_hf:
        export_hf(step_dir, args.to_hf)
        print(f"exported {step_dir} to {args.to_hf}")
    if args.tp or args.pp or args.dp:
        if not args.out:
            raise ValueError("resharding needs --out DIR")
        meta = json.loads((step_dir / "meta.json").read_text())["layout"]
        tp, pp, dp = (args.tp or meta["tp"], args.pp or meta["pp"], args.dp or meta["dp"])
        reshard_training(step_dir, args.out, tp, pp, dp)
        print(f"resharded {step_dir} to tp={tp} pp={pp} dp={dp} in {args.out}")
    elif not args.to_hf:
        raise ValueError("with --from, give --to-hf DIR and/or --tp/--pp/--dp with --out DIR")
    return 0


def check(args: argparse.Namespace) -> None:
    """Which conversion, and whether its inputs exist and fit, before any worker starts."""
    if args.model and args.src:
        raise ValueError("give either --model (save a model) or --from (merge or reshard a "
                         "checkpoint), not both")
    if args.model:
        if not (args.tp and args.out):
            raise ValueError("saving a model needs --tp N and --out DIR")
        from ..partition import HeadLayout
        from .source import resolve
        cfg = resolve(args.model).config
        HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, args.tp)
        return
    if not args.src:
        raise ValueError("give --model (save) or --from (merge with --to-hf, reshard with --tp)")
    src = Path(args.src)
    if not src.exists():
        raise FileNotFoundError(f"checkpoint {src} does not exist")
    if not (args.to_hf or args.tp or args.pp or args.dp):
        raise ValueError("with --from, give --to-hf DIR and/or --tp/--pp/--dp with --out DIR")
    if (args.tp or args.pp or args.dp) and not args.out:
        raise ValueError("resharding needs --out DIR")
    if (src / META).exists():
        if args.pp not in (None, 1) or args.dp not in (None, 1):
            raise ValueError("a model checkpoint has only a tensor-parallel layout: use --tp")
        if args.tp:
            from ..models.config import LlamaConfig
            from ..partition import HeadLayout
            cfg = LlamaConfig.from_hf(src / "config.json")
            HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, args.tp)
    else:
        from ..train.ckpt import find_checkpoint
        find_checkpoint(src)  # raises with what it expected when src is neither format


def run(args: argparse.Namespace) -> int:
    if args.model:
        if not (args.tp and args.out):
            raise ValueError("saving a model needs --tp N and --out DIR")
        from ..partition import HeadLayout
        from .source import resolve
        cfg = resolve(args.model).config
        HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, args.tp)
        from ..launch import spawn
        spawn(_save_worker, args.tp, args.model, args.tp, args.out)
        print(f"saved {args.model} at tp={args.tp} to {args.out}")
        return 0
    if not args.src:
        raise ValueError("give --model (save) or --from (merge with --to-hf, reshard with --tp)")
    src = Path(args.src)
    if not src.exists():
        raise FileNotFoundError(f"checkpoint {src} does not exist")
    if not (src / META).exists():  # a training checkpoint (shardwise train): weights + AdamW
        return _convert_training(src, args)
    if args.to_hf:
        merge_to_hf(src, args.to_hf)
        print(f"merged {src} into {args.to_hf}")
    if args.pp not in (None, 1) or args.dp not in (None, 1):
        raise ValueError("a model checkpoint has only a tensor-parallel layout: use --tp")
    if args.tp:
        if not args.out:
            raise ValueError("resharding needs --out DIR")
        from ..models.config import LlamaConfig
        from ..partition import HeadLayout
        cfg = LlamaConfig.from_hf(src / "config.json")
        HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, args.tp)
        reshard(src, args.out, args.tp)
        print(f"resharded {src} to tp={args.tp} in {args.out}")
    if not (args.to_hf or args.tp):
        raise ValueError("with --from, give --to-hf DIR and/or --tp N --out DIR")
    return 0
