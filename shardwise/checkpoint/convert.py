"""Save a model as a sharded checkpoint, reshard any checkpoint to another layout, export one to
Hugging Face; and ``shardwise convert``. The format is :mod:`shardwise.checkpoint.sharded`; every
write goes through :mod:`shardwise.checkpoint.atomic` (a killed write leaves the old directory).

    shardwise convert --model smollm2-135m --tp 2 --out ckpt/tp2     # save at tp=2
    shardwise convert --from ckpt/tp2 --tp 3 --out ckpt/tp3          # reshard (any tp/pp/dp)
    shardwise convert --from runs/x/checkpoints --to-hf hf/x         # export for transformers
    shardwise convert --from OLD --out NEW                           # rewrite an older format
    shardwise convert --model smollm2-135m --quant int4 --tp 2 --out q4/tp2   # quantize
    shardwise convert --from q4/tp2 --tp 3 --out q4/tp3              # a quantized one, resharded

Quantized checkpoints (``--quant``, :mod:`.qsharded`) are written in one process, one target
rank and one tensor at a time, from a float model (fp32/bf16: quantized on the full tensors'
grids) or from a GGUF (its Q4_0/Q4_1/Q8_0 blocks kept as they are).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..mesh import LayoutOnly, group_rank, group_size
from ..partition import HeadLayout, stage_layers
from ..shards import assemble_local, sharded_params
from .atomic import atomic_dir, publish, staging_dir
from .sharded import (KINDS, Checkpoint, copy_tokenizer, has_tokenizer, pieces_of_tensor,
                      shard_file, write_file, write_meta)


def save_model(model: nn.Module, directory: str | Path, *, group=None, name: str | None = None,
               tokenizer: str | Path | None = None) -> Path:
    """Every rank of the tensor-parallel ``group`` writes its shard; rank 0 publishes the
    directory. Collective over ``group``."""
    rank, tp = group_rank(group), group_size(group)
    target = Path(directory)
    staging = target.parent / f"{target.name}.tmp"
    if rank == 0:
        staging_dir(target)
    if tp > 1:
        dist.barrier(group=group)
    items = [it for path, p, _ in sharded_params(model) for it in pieces_of_tensor("param", path, p, p)]
    write_file(staging / shard_file(0, 0, rank), items)
    if tp > 1:
        dist.barrier(group=group)
    if rank == 0:
        files = {shard_file(0, 0, r): {"rank": r, "pp": 0, "dp": 0, "tp": r} for r in range(tp)}
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        write_meta(staging, {"kind": "model", "model": name, "dtype": dtype, "files": files,
                             "layout": {"tp": tp, "pp": 1, "dp": 1, "zero": 0}},
                   model.config.to_hf(), tokenizer)
        publish(staging, target)
    if tp > 1:
        dist.barrier(group=group)
    return target


def check_layout(cfg, tp: int, pp: int, dp: int) -> None:
    from ..mesh import validate
    validate(tp, pp, dp, tp * pp * dp)
    if pp > cfg.num_hidden_layers:
        raise ValueError(f"pp={pp} but the model has {cfg.num_hidden_layers} layers: use "
                         f"pp <= {cfg.num_hidden_layers}")
    HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, tp)


@torch.no_grad()
def save_quantized(spec: str, out: str | Path, *, tp: int, pp: int = 1, quant=None) -> Path:
    """Write model ``spec`` (a preset, HF directory, GGUF or sharded checkpoint) quantized with
    ``quant`` (a quantized checkpoint: as it is stored) as a checkpoint for layout (tp, pp)."""
    from .qsharded import write_quantized
    from .source import quant_for, readers, resolve
    source = resolve(spec, dense=False)
    quant = quant_for(source, quant)
    if quant is None:
        raise ValueError(f"{spec} is not quantized: give --quant int8 or int4")
    check_layout(source.config, tp, pp, 1)
    with readers(source, quant=quant) as (read, qread):
        return atomic_dir(out, lambda tmp: write_quantized(
            tmp, source.config, quant, tp=tp, pp=pp, read=read, qread=qread,
            meta={"model": source.name, "dtype": "float32"}, tokenizer=source.tokenizer))


@torch.no_grad()
def reshard(src: str | Path, out: str | Path, *, tp: int, pp: int = 1, dp: int = 1) -> Path:
    """Rewrite checkpoint ``src`` (any format, any layout) at ``out`` for layout (tp, pp, dp):
    the one resharding function, for model and training checkpoints (optimizer states included;
    RNG states are per rank and dropped). Runs in one process: each target rank's pieces come
    from building its stage of the model on the meta device under a :class:`LayoutOnly` group."""
    from ..models.config import LlamaConfig
    from ..models.llama import LlamaForCausalLM
    ck = Checkpoint(src)
    if ck.meta.get("quant"):
        return save_quantized(str(ck.dir), out, tp=tp, pp=pp)
    cfg = LlamaConfig.from_hf(ck.config)
    check_layout(cfg, tp, pp, dp)
    kinds = [k for k in KINDS if ck.has(k)]

    def fill(tmp: Path) -> None:
        files = {}
        for p in range(pp):
            for t in range(tp):
                model = LlamaForCausalLM(cfg, group=LayoutOnly(tp, t), device="meta",
                                         layers=stage_layers(cfg.num_hidden_layers, pp, p))
                items = []
                for path, param, _ in sharded_params(model):
                    for kind in kinds:
                        value = assemble_local(path, param, ck.reader(kind))
                        items += list(pieces_of_tensor(kind, path, param, value))
                files[shard_file(p, 0, t)] = {"rank": p * dp * tp + t, "pp": p, "dp": 0, "tp": t}
                write_file(tmp / shard_file(p, 0, t), items)
        keep = {k: v for k, v in ck.meta.items()
                if k not in ("format", "files", "layout", "config", "tokenizer")}
        tok = ck.dir if has_tokenizer(ck.dir) else ck.meta.get("tokenizer")
        write_meta(tmp, dict(keep, files=files, layout={"tp": tp, "pp": pp, "dp": dp, "zero": 0}),
                   ck.config, tok)
    return atomic_dir(out, fill)


def export_hf(src: str | Path, out: str | Path) -> Path:
    """Write checkpoint ``src``'s full model as a Hugging Face directory (``config.json``,
    ``model.safetensors``, the tokenizer files) that transformers and ``--model`` load; vocabulary
    padding is not part of any piece, so it is not written."""
    from safetensors.torch import save_file
    import json
    ck = Checkpoint(src)
    if ck.meta.get("quant"):
        raise ValueError(f"{ck.dir} is quantized ({ck.meta['quant']['method']}): export its float "
                         "source to Hugging Face instead")

    def fill(tmp: Path) -> None:
        tensors = {n: ck.full("param", n).contiguous() for n in ck.names("param")}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(ck.config, indent=2))
        copy_tokenizer(ck.dir if has_tokenizer(ck.dir) else ck.meta.get("tokenizer"), tmp)
    return atomic_dir(out, fill)


# ---------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="save: a model (preset, HF dir, .gguf) to shard at --tp")
    p.add_argument("--from", dest="src", help="a checkpoint (model or training, any format) to "
                   "export, reshard or rewrite")
    from ..usage import int_range
    p.add_argument("--tp", type=int_range(1), help="tensor-parallel size of the output")
    p.add_argument("--pp", type=int_range(1), default=None, help="pipeline stages of the output")
    p.add_argument("--dp", type=int_range(1), default=None, help="data-parallel size of the output")
    p.add_argument("--to-hf", help="export --from as a Hugging Face directory")
    p.add_argument("--out", help="output checkpoint directory")
    from ..quant.config import add_arguments as quant_arguments
    quant_arguments(p)


def _save_worker(model_spec: str, tp: int, out: str) -> None:
    from ..failure import phase
    from ..mesh import Mesh
    from .source import build_model, resolve
    with phase("start"):
        mesh = Mesh.init(tp=tp)
    src = resolve(model_spec)
    model = build_model(src, group=mesh.tp_group)
    with phase("save"):
        save_model(model, out, group=mesh.tp_group, name=src.name, tokenizer=src.tokenizer)


def check(args: argparse.Namespace) -> None:
    """Which conversion, and whether its inputs exist and fit, before any worker starts."""
    if args.model and args.src:
        raise ValueError("give either --model (save a model) or --from (export, reshard or "
                         "rewrite a checkpoint), not both")
    from ..quant.config import from_args
    args.quant_config = from_args(args)
    if args.model:
        if not (args.tp and args.out):
            raise ValueError("saving a model needs --tp N and --out DIR")
        from .source import quant_for, resolve
        source = resolve(args.model, dense=args.quant_config is None)
        quant_for(source, args.quant_config)
        cfg = source.config
        HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, args.tp)
        return
    if not args.src:
        raise ValueError("give --model (save) or --from (export with --to-hf, reshard with "
                         "--tp/--pp/--dp and --out)")
    src = Path(args.src)
    if not src.exists():
        raise FileNotFoundError(f"checkpoint {src} does not exist")
    if (args.tp or args.pp or args.dp) and not args.out:
        raise ValueError("resharding needs --out DIR")
    if not (args.to_hf or args.out):
        raise ValueError("with --from, give --to-hf DIR and/or --out DIR (with --tp/--pp/--dp)")
    ck = Checkpoint(src)  # one line when src is no checkpoint of any format
    if args.quant_config is not None and (args.to_hf or not args.out):
        raise ValueError("--quant writes a quantized checkpoint: give --out DIR (not --to-hf)")
    if args.out:
        from ..models.config import LlamaConfig
        check_layout(LlamaConfig.from_hf(ck.config), *_out_layout(args, ck))


def _is_quantized(spec: str) -> bool:
    from .sharded import is_checkpoint
    return is_checkpoint(spec) and bool(Checkpoint(spec).meta.get("quant"))


def _out_layout(args: argparse.Namespace, ck: Checkpoint) -> tuple[int, int, int]:
    lay = ck.layout
    return args.tp or lay["tp"], args.pp or lay["pp"], args.dp or lay["dp"]


def run(args: argparse.Namespace) -> int:
    """The conversion :func:`check` accepted."""
    quant = args.quant_config
    if args.model and (quant is not None or _is_quantized(args.model)):
        save_quantized(args.model, args.out, tp=args.tp, quant=quant)
        print(f"saved {args.model} quantized at tp={args.tp} to {args.out}")
        return 0
    if args.model:
        from ..launch import spawn
        spawn(_save_worker, args.tp, args.model, args.tp, args.out)
        print(f"saved {args.model} at tp={args.tp} to {args.out}")
        return 0
    ck = Checkpoint(args.src)
    if quant is not None:
        tp, pp, _ = _out_layout(args, ck)
        save_quantized(str(ck.dir), args.out, tp=tp, pp=pp, quant=quant)
        print(f"wrote {ck.dir} quantized ({quant.method}) at tp={tp} pp={pp} to {args.out}")
        return 0
    if args.to_hf:
        export_hf(ck.dir, args.to_hf)
        print(f"exported {ck.dir} to {args.to_hf}")
    if args.out:
        tp, pp, dp = _out_layout(args, ck)
        reshard(ck.dir, args.out, tp=tp, pp=pp, dp=dp)
        print(f"wrote {ck.dir} at tp={tp} pp={pp} dp={dp} to {args.out}")
    return 0
