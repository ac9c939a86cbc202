"""The architecture families the one decoder runs, as data.

A family is an :class:`ArchSpec`: how its decoder differs from Llama's. ``models/llama.py``
reads the spec once, when a layer is built; nothing branches on the family name at run time.
Values that differ between models of one family (window sizes, soft-cap values, rope bases)
live in :class:`~shardwise.models.config.LlamaConfig`, read from ``config.json``.

================  ====================================================================
family            differences from Llama
================  ====================================================================
llama             (the reference: RMSNorm, SwiGLU, rope, optional q/k/v bias)
mistral           sliding-window attention on every layer (``sliding_window``)
qwen2             q/k/v bias; sliding window from layer ``max_window_layers`` on
qwen3             per-head RMSNorm of q and k before rope; Qwen2's window rule
gemma2            RMSNorm with ``(1 + w)``; GeGLU (tanh GELU); embeddings x sqrt(hidden);
                  norms after attention and MLP too; attention and final-logit soft-caps;
                  query scale ``query_pre_attn_scalar^-1/2``; alternating window layers
gemma3_text       Gemma 2 plus per-head q/k RMSNorm; a rope base of its own for window layers
                  (``rope_local_base_freq``); a window layer pattern of 5 local : 1 global
phi3              checkpoint with fused ``qkv_proj`` and ``gate_up_proj`` tensors;
                  partial rotary; ``longrope`` scaling (Phi-3, Phi-3.5, Phi-4-mini)
mixtral           mixture of experts (top-k, renormalised); the block is ``block_sparse_moe``
                  with experts ``w1`` / ``w3`` / ``w2`` in the checkpoint; optional window
qwen3_moe         Qwen3's per-head q/k norms; mixture of experts (``norm_topk_prob``), dense
                  MLPs in ``mlp_only_layers`` and between ``decoder_sparse_step`` layers
olmoe             q/k RMSNorm over all heads at once (statistics over the full width: one
                  all-reduce more per attention under TP); ``clip_qkv``; mixture of experts
================  ====================================================================

The MLP slot is pluggable: ``ArchSpec.mlp`` names an entry of
:data:`shardwise.models.llama.MLPS` (``"gated"``: ``down(act(gate(x)) * up(x))``; ``"moe"``:
:class:`shardwise.models.moe.MoEBlock`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

WINDOW_RULES = ("none", "all", "gated", "layer_types")


@dataclass(frozen=True)
class GGUFNames:
    """How llama.cpp's converter writes a family (``convert_hf_to_gguf.py``).

    ``arch``: the GGUF ``general.architecture``; ``permute_qk``: q/k rows permuted for GGML's
    rotary layout (Llama only); ``norm_plus_one``: the converter stored ``1 + w`` for every
    norm weight (Gemma), so reading subtracts the 1 back out; ``blocks``: llama.cpp's block
    tensor names that mean something else than for Llama (Gemma's ``ffn_norm`` is the norm
    *before* the MLP, HF's ``pre_feedforward_layernorm``)."""

    arch: str
    permute_qk: bool = False
    norm_plus_one: bool = False
    blocks: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ArchSpec:
    """How one family's decoder differs from Llama's.

    ``norm_offset``: RMSNorm scales by ``offset + w`` (Gemma: 1, computed in float32);
    ``qk_norm``: RMSNorm over each head of q and k before rope; ``sandwich_norms``: norms on
    the attention and MLP outputs too (4 per layer, Gemma 2/3); ``embed_scale``: embeddings
    times sqrt(hidden); ``fused_checkpoint``: the checkpoint stores ``qkv_proj`` and
    ``gate_up_proj`` fused (Phi-3), each rank reads its rows out of them;
    ``attention_bias``: fixed by the family, or ``None`` when ``attention_bias`` decides;
    ``window``: which layers slide when a window is set -- ``"none"`` (never), ``"all"``,
    ``"gated"`` (``use_sliding_window`` and layers >= ``max_window_layers``) or
    ``"layer_types"`` (per layer, default ``window_pattern``: every n-th layer global);
    ``local_rope``: window layers have a rope base of their own (Gemma 3: ``rope_local_base_freq``,
    5.x ``rope_parameters`` per layer type); ``partial_rotary``: ``partial_rotary_factor`` may be
    below 1 (Phi-3; the other families' transformers models rotate the whole head);
    ``attn_softcap`` / ``final_softcap``: the family reads ``attn_logit_softcapping`` /
    ``final_logit_softcapping`` (Gemma 3 only the latter: transformers' Gemma 3 never applies
    an attention soft-cap, and no released Gemma 3 sets one);
    ``mlp``: the MLP kind (a key of :data:`~shardwise.models.llama.MLPS`); ``defaults``:
    transformers' values for the family's keys a config.json may omit.

    Mixtures of experts (``mlp="moe"``): ``mlp_module`` names the block in the checkpoint
    (Mixtral: ``block_sparse_moe``); ``expert_names`` each expert's gate, up and down tensors;
    ``router_norm``: the top-k probabilities renormalised by architecture (Mixtral), or ``None``
    when ``norm_topk_prob`` decides; ``qk_norm_all``: the q/k norm spans all heads (OLMoE: one
    weight of ``heads x head_dim``, statistics over the full width), not each head;
    ``clip_qkv``: the family reads ``clip_qkv`` (q, k, v clamped to +-c after the norms)."""

    model_type: str
    hf_class: str
    activations: tuple[str, ...] = ("silu",)
    norm_offset: float = 0.0
    qk_norm: bool = False
    sandwich_norms: bool = False
    embed_scale: bool = False
    fused_checkpoint: bool = False
    attention_bias: bool | None = None
    window: str = "none"
    window_pattern: int = 0
    local_rope: bool = False
    partial_rotary: bool = False
    attn_softcap: bool = False
    final_softcap: bool = False
    mlp: str = "gated"
    gguf: GGUFNames | None = None
    defaults: Mapping[str, object] = field(default_factory=dict)
    mlp_module: str = "mlp"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    router_norm: bool | None = None
    qk_norm_all: bool = False
    clip_qkv: bool = False

    def __post_init__(self) -> None:
        if self.window not in WINDOW_RULES:
            raise ValueError(f"window rule {self.window!r}: use one of {WINDOW_RULES}")


ARCHS: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    ARCHS[spec.model_type] = spec
    return spec


def arch_of(model_type: str) -> ArchSpec:
    if model_type not in ARCHS:
        raise ValueError(f"architecture {model_type!r} is not supported: shardwise runs "
                         f"{', '.join(ARCHS)}")
    return ARCHS[model_type]


_GELU = ("gelu_pytorch_tanh", "gelu_tanh")
_GEMMA_GGUF = {"ffn_norm": "pre_feedforward_layernorm",
               "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"}
# transformers' defaults (its config classes) for keys a config.json may omit
_COMMON = {"rms_norm_eps": 1e-6, "initializer_range": 0.02, "tie_word_embeddings": False,
           "hidden_act": "silu", "rope_theta": 10000.0}
_QWEN = {**_COMMON, "max_position_embeddings": 32768, "bos_token_id": None, "eos_token_id": None,
         "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}
_GEMMA = {**_COMMON, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
          "tie_word_embeddings": True, "num_key_value_heads": 4, "head_dim": 256,
          "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "attention_bias": False,
          "query_pre_attn_scalar": 256, "sliding_window": 4096}

register(ArchSpec("llama", "LlamaForCausalLM", gguf=GGUFNames("llama", permute_qk=True),
                  defaults={**_COMMON, "max_position_embeddings": 2048,
                            "num_key_value_heads": None, "bos_token_id": 1, "eos_token_id": 2,
                            "attention_bias": False, "mlp_bias": False}))
register(ArchSpec("mistral", "MistralForCausalLM", attention_bias=False, window="all",
                  defaults={**_COMMON, "max_position_embeddings": 4096 * 32,
                            "num_key_value_heads": 8, "bos_token_id": 1, "eos_token_id": 2,
                            "sliding_window": 4096}))
register(ArchSpec("qwen2", "Qwen2ForCausalLM", attention_bias=True, window="gated",
                  gguf=GGUFNames("qwen2"), defaults={**_QWEN, "num_key_value_heads": 32}))
register(ArchSpec("qwen3", "Qwen3ForCausalLM", qk_norm=True, window="gated",
                  gguf=GGUFNames("qwen3"),
                  defaults={**_QWEN, "num_key_value_heads": 32, "head_dim": 128,
                            "attention_bias": False}))
register(ArchSpec("gemma2", "Gemma2ForCausalLM", activations=_GELU, norm_offset=1.0,
                  sandwich_norms=True, embed_scale=True, window="layer_types", window_pattern=2,
                  attn_softcap=True, final_softcap=True,
                  gguf=GGUFNames("gemma2", norm_plus_one=True, blocks=_GEMMA_GGUF),
                  defaults={**_GEMMA, "max_position_embeddings": 8192,
                            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}))
register(ArchSpec("gemma3_text", "Gemma3ForCausalLM", activations=_GELU, norm_offset=1.0,
                  qk_norm=True, sandwich_norms=True, embed_scale=True, window="layer_types",
                  window_pattern=6, local_rope=True, final_softcap=True,
                  gguf=GGUFNames("gemma3", norm_plus_one=True, blocks=_GEMMA_GGUF),
                  defaults={**_GEMMA, "max_position_embeddings": 131072, "rope_theta": 1e6,
                            "rope_local_base_freq": 1e4, "final_logit_softcapping": None}))
register(ArchSpec("phi3", "Phi3ForCausalLM", fused_checkpoint=True, attention_bias=False,
                  window="all", partial_rotary=True,
                  gguf=GGUFNames("phi3", blocks={"ffn_up": "mlp.gate_up_proj"}),
                  defaults={**_COMMON, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                            "num_key_value_heads": None, "bos_token_id": 1,
                            "eos_token_id": 32000, "pad_token_id": 32000,
                            "sliding_window": None}))

_MOE = {"norm_topk_prob": False, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
        "decoder_sparse_step": 1, "mlp_only_layers": (), "moe_intermediate_size": None}
register(ArchSpec("mixtral", "MixtralForCausalLM", attention_bias=False, window="all", mlp="moe",
                  mlp_module="block_sparse_moe", expert_names=("w1", "w3", "w2"), router_norm=True,
                  defaults={**_COMMON, **_MOE, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                            "max_position_embeddings": 4096 * 32, "num_key_value_heads": 8,
                            "bos_token_id": 1, "eos_token_id": 2, "sliding_window": None,
                            "num_local_experts": 8, "num_experts_per_tok": 2}))
register(ArchSpec("qwen3_moe", "Qwen3MoeForCausalLM", qk_norm=True, mlp="moe",
                  defaults={**_QWEN, **_MOE, "num_key_value_heads": 4, "head_dim": None,
                            "attention_bias": False, "sliding_window": None,
                            "num_local_experts": 128, "num_experts_per_tok": 8,
                            "moe_intermediate_size": 768}))
register(ArchSpec("olmoe", "OlmoeForCausalLM", qk_norm=True, qk_norm_all=True, clip_qkv=True,
                  mlp="moe",
                  defaults={**_COMMON, **_MOE, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                            "num_key_value_heads": None, "bos_token_id": None,
                            "eos_token_id": 50279, "pad_token_id": 1, "attention_bias": False,
                            "router_aux_loss_coef": 0.01, "num_experts": 64,
                            "num_experts_per_tok": 8, "clip_qkv": None}))
