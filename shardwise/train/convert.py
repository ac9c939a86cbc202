"""Offline conversions of training checkpoints, for ``shardwise convert``.

* :func:`export_hf`: full tensors (assembled from every shard) -> a Hugging Face directory
  (``config.json``, ``model.safetensors``, the tokenizer files when the run had them) that
  ``transformers`` and ``shardwise --model DIR`` load.
* :func:`reshard`: rewrite a checkpoint for another (tp, pp, dp), AdamW moments included. Each
  target rank's pieces come from building its stage of the model under a *fake* process group
  (``torch.testing``'s ``FakeStore``: groups exist, no collective runs), one rank at a time, in
  this process. ``--resume`` also reshards on load, so this is only needed to ship a checkpoint
  in a fixed layout.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import torch

from ..models.config import LlamaConfig
from ..shards import assemble_local, sharded_params
from .ckpt import CheckpointReader, shard_state
from .config import stage_layers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")


def export_hf(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the checkpoint's full model as a Hugging Face safetensors directory; returns it."""
    from safetensors.torch import save_file
    ck = CheckpointReader(ckpt_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: ck.full("param", n).contiguous() for n in ck.names("param")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(ck.meta["config"], indent=1))
    tok = ck.meta.get("tokenizer")
    if tok and Path(tok).is_dir():
        for f in TOKENIZER_FILES:
            if (Path(tok) / f).is_file():
                shutil.copy(Path(tok) / f, out / f)
    return out


@contextlib.contextmanager
def _fake_rank(rank: int, world: int) -> Iterator[None]:
    """This process pretends to be ``rank`` of ``world`` (fake backend: no communication)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from ..mesh import forget_groups
    if dist.is_initialized():
        raise RuntimeError("reshard runs outside a distributed job (a process group exists)")
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
        forget_groups()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@torch.no_grad()
def reshard(ckpt_dir: str | Path, out_dir: str | Path, tp: int, pp: int, dp: int) -> Path:
    """Write ``out_dir/step_N`` (+ ``latest``) holding the checkpoint in layout (tp, pp, dp)."""
    from ..mesh import Mesh, grid, validate
    from ..models.llama import LlamaForCausalLM
    from ..partition import HeadLayout
    ck = CheckpointReader(ckpt_dir)
    cfg = LlamaConfig.from_hf(ck.meta["config"])
    validate(tp, pp, dp, tp * pp * dp)
    if pp > cfg.num_hidden_layers:
        raise ValueError(f"pp={pp} but the model has {cfg.num_hidden_layers} layers")
    HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, tp)
    root = Path(out_dir)
    name = f"step_{ck.meta['step']:08d}"
    tmp = root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = []
    g = grid(tp, pp, dp)
    for p in range(pp):
        for t in range(tp):
            with _fake_rank(int(g[p, 0, t]), tp * pp * dp):
                mesh = Mesh.init(tp, pp, dp, backend="gloo")
                model = LlamaForCausalLM(cfg, group=mesh.tp_group,
                                         layers=stage_layers(cfg.num_hidden_layers, pp, p))
                state = {}
                for path, param, _ in sharded_params(model):
                    param.copy_(assemble_local(path, param, ck.reader("param")))
                    if ck.opt_step > 0:
                        state[param] = {"step": torch.tensor(ck.opt_step),
                                        **{k: assemble_local(path, param, ck.reader(k))
                                           for k in ("exp_avg", "exp_avg_sq")}}
                f = f"shard-pp{p}-tp{t}.pt"
                torch.save(shard_state(model, SimpleNamespace(state=state)), tmp / f)
                files.append(f)
    meta = dict(ck.meta, layout={"tp": tp, "pp": pp, "dp": dp}, files=files)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(root / name, ignore_errors=True)
    os.replace(tmp, root / name)
    (root / "latest").write_text(name)
    return root / name
