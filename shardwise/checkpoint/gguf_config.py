"""config.json from a GGUF's metadata (``{arch}.*`` keys, ``tokenizer.ggml.*``, rope tensors).

Keys llama.cpp writes for every family give the shape; per family (``ArchSpec``) come the window
(``attention.sliding_window``; Phi-3 writes 0 for none), the soft-caps (Gemma 2), the rotary
dimension and longrope factors (Phi-3: ``rope.dimension_count``, ``rope_factors_long`` /
``rope_factors_short``, ``rope.scaling.original_context_length``, ``rope.scaling.attn_factor``).
What llama.cpp does not store is taken as llama.cpp itself takes it: Gemma 3's window layers use
rope base 10000 and a pattern of 5 local : 1 global (unless ``attention.sliding_window_pattern``
says otherwise), and Gemma's query scale is ``head_dim^-1/2``, except for the 27B models (46
layers for Gemma 2, 62 for Gemma 3) where it is ``(hidden / heads)^-1/2``.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..models.families import ArchSpec
from ..models.hf_config import rope_keys

ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling factors; folded into config.json
LONGROPE_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")  # Phi-3
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GEMMA3_LOCAL_BASE, _GEMMA3_PATTERN = 10000.0, 6


def field(reader: Any, key: str, default: Any = None) -> Any:
    value = reader.fields.get(key)
    return default if value is None else value.contents()


def _llama3_factors(scaling: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of llama3 rope scaling, (head_dim/2,), as llama.cpp stores in rope_freqs."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / hi, 1.0, np.where(wavelen > old_ctx / lo, factor, mid))


def _rope_scaling(reader: Any, arch: str, theta: float, head_dim: int) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from GGUF metadata, or from llama3's ``rope_freqs`` tensor.

    llama.cpp keeps only the factors of llama3 scaling; the HF parameters are recovered as Meta's
    published ones (low 1, high 4, original context 8192) with factor = max, and checked against them.
    """
    kind = field(reader, f"{arch}.rope.scaling.type")
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:
        factors = np.asarray(freqs.data, dtype=np.float64).reshape(-1)
        scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        if factors.shape != (head_dim // 2,) or not np.allclose(
                _llama3_factors(scaling, theta, head_dim), factors, rtol=1e-4):
            raise ValueError(f"{ROPE_FREQS} does not match llama3 rope scaling with factor "
                             f"{scaling['factor']}, low 1, high 4, original context 8192")
        return scaling
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(field(reader, f"{arch}.rope.scaling.factor"))}
    raise ValueError(f"GGUF rope scaling type {kind!r} is not supported (supported: linear, llama3)")


def _nice(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974738e-06 -> 1e-05)."""
    return float(f"{float(x):.7g}")


def hf_config(reader: Any, arch_name: str, arch: ArchSpec, dtype: torch.dtype) -> dict[str, Any]:
    """config.json contents from the ``{arch}.*`` and ``tokenizer.ggml.*`` metadata."""
    get = lambda key, default=None: field(reader, f"{arch_name}.{key}", default)  # noqa: E731
    names = {t.name: t for t in reader.tensors}
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if not isinstance(kv_heads, int):
        raise ValueError(f"per-layer KV head counts {kv_heads} are not supported")
    head_dim = int(get("attention.key_length", hidden // heads))
    theta = _nice(get("rope.freq_base", 10000.0))
    if arch.fused_checkpoint and head_dim * heads != hidden:  # Phi-3: head_dim is hidden / heads
        raise ValueError(f"{arch_name}: key_length {head_dim} x {heads} heads != hidden {hidden}")
    cfg = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _nice(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": int(names["token_embd.weight"].shape[-1]),  # ggml shape (hidden, vocab)
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if arch.attention_bias is None:
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    family = _family_config(get, arch, cfg, _longrope_factors(reader))
    scaling = family.pop("rope_scaling", None) or _rope_scaling(reader, arch_name, theta, head_dim)
    cfg.update(family)
    cfg.update(rope_keys(theta, scaling, partial=family.get("partial_rotary_factor"),
                         local_theta=family.get("rope_local_base_freq")))
    for key in ("bos", "eos", "padding"):
        token_id = field(reader, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            cfg[{"padding": "pad"}.get(key, key) + "_token_id"] = int(token_id)
    return cfg


def _longrope_factors(reader: Any) -> dict[str, list[float]] | None:
    """Phi-3's longrope factors (``{"long": [...], "short": [...]}``), or ``None``."""
    found = {t.name: t for t in reader.tensors if t.name in LONGROPE_TENSORS}
    if not found:
        return None
    return {name.split("_")[2].split(".")[0]: np.asarray(t.data, dtype=np.float64).reshape(-1)
            .tolist() for name, t in found.items()}


def _family_config(get: Callable[..., Any], arch: ArchSpec, cfg: dict[str, Any],
                   longrope: dict[str, list[float]] | None) -> dict[str, Any]:
    """The config keys of ``arch`` that differ from Llama's (see the module docstring)."""
    name, out = arch.gguf.arch, {}
    if arch.window != "none":
        window = get("attention.sliding_window")
        out["sliding_window"] = int(window) if window else None
    if arch.norm_offset:  # Gemma
        big = cfg["num_hidden_layers"] == _GEMMA_27B_LAYERS.get(name)
        out.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                   query_pre_attn_scalar=cfg["hidden_size"] // cfg["num_attention_heads"]
                   if big else cfg["head_dim"])
    if arch.attn_softcap:
        out["attn_logit_softcapping"] = get("attn_logit_softcapping")
    if arch.final_softcap:
        out["final_logit_softcapping"] = get("final_logit_softcapping")
    if arch.local_rope:  # Gemma 3
        pattern = get("attention.sliding_window_pattern", _GEMMA3_PATTERN)
        n = cfg["num_hidden_layers"]
        out["layer_types"] = ["sliding_attention" if slides else "full_attention" for slides in
                              (pattern if isinstance(pattern, list) else
                               [bool((i + 1) % int(pattern)) for i in range(n)])]
        out["rope_local_base_freq"] = _GEMMA3_LOCAL_BASE
    if arch.partial_rotary:  # Phi-3
        out["partial_rotary_factor"] = int(get("rope.dimension_count", cfg["head_dim"])) \
            / cfg["head_dim"]
        if longrope is not None:
            original = int(get("rope.scaling.original_context_length"))
            out["original_max_position_embeddings"] = original
            out["rope_scaling"] = {"rope_type": "longrope", "long_factor": longrope["long"],
                                   "short_factor": longrope["short"],
                                   "original_max_position_embeddings": original,
                                   "attention_factor": float(get("rope.scaling.attn_factor", 1.0))}
    return out
