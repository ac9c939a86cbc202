"""The one reader and writer of Hugging Face ``config.json`` for the supported families.

transformers 4.x and 5.x spell the same model differently; both are read, by transformers 5's
own precedence (``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict``):

====================== ================================== ======================================
field                  4.x                                5.x
====================== ================================== ======================================
rope theta             ``rope_theta``                     ``rope_parameters.rope_theta``
rope scaling and type  ``rope_scaling`` (``type`` or      ``rope_parameters`` (``rope_type``,
                       ``rope_type``, factor, ...)        factor, ...)
partial rotary factor  ``partial_rotary_factor``          ``rope_parameters.partial_rotary_factor``
window layers' rope    ``rope_local_base_freq``           ``rope_parameters`` per layer type
(Gemma 3)              (``rope_scaling``: global layers)  (``sliding_attention``,
                                                          ``full_attention``)
sliding window         ``sliding_window`` (+ Qwen's       the same, plus ``layer_types``
                       ``use_sliding_window``,            (``"sliding_attention"`` per layer)
                       ``max_window_layers``; Gemma 3's
                       ``sliding_window_pattern``)
activation             ``hidden_act`` (Gemma:             the same
                       ``hidden_activation``)
experts (MoE)          ``num_local_experts`` (Mixtral,    the same
                       Qwen3-MoE) or ``num_experts``
                       (OLMoE; Qwen3-MoE's cards)
====================== ================================== ======================================

Precedence: ``rope_scaling`` (when not null) replaces ``rope_parameters``; a ``rope_theta`` inside
the block wins over the top-level one; a top-level ``original_max_position_embeddings`` wins
over the block's (Phi-3 writes it there), which defaults to ``max_position_embeddings``; Phi-3's
old ``su`` / ``yarn`` types mean ``longrope``. Keys a file omits take the family's transformers
default (``ArchSpec.defaults``: e.g. Mistral's 4096-token window, Gemma 2's soft-caps 50 and 30).

:func:`write_hf_config` writes both styles at once (``rope_theta`` + ``rope_scaling`` and the
family's 4.x keys, ``rope_parameters`` and ``layer_types`` for 5.x, consistent with each other),
so either version reads back the model this library runs.

The families are data (:data:`shardwise.models.families.ARCHS`): a feature a family's
transformers model does not run is refused here with the numbers (``partial_rotary_factor`` < 1
outside Phi-3, per-layer-type rope outside Gemma 3). Nothing else in the library reads config
keys.
"""
from __future__ import annotations

from typing import Any, Mapping

from .families import ARCHS, ArchSpec

ROPE_TYPES: dict[str, tuple[str, ...]] = {  # supported rope types -> their parameters
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}
LONGROPE_OPTIONAL = ("factor", "attention_factor")
LAYER_TYPES = ("full_attention", "sliding_attention")
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads")


WRAPPERS = {"gemma3": "gemma3_text"}
"""Multimodal configs whose ``text_config`` is a supported family's: its language model runs
(Gemma 3 4B and larger ship as ``Gemma3ForConditionalGeneration``; the vision tower is not
loaded)."""


def language_model_config(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """``raw`` itself, or the ``text_config`` of a :data:`WRAPPERS` config."""
    mt = raw.get("model_type", "")
    if mt not in WRAPPERS:
        return raw
    text = dict(raw.get("text_config") or {})
    text["model_type"] = WRAPPERS[mt]
    text["final_logit_softcapping"] = None  # the multimodal model's head has none (transformers)
    if "tie_word_embeddings" in raw:
        text.setdefault("tie_word_embeddings", raw["tie_word_embeddings"])
    return text


def family_of(raw: Mapping[str, Any]) -> ArchSpec:
    mt = raw.get("model_type", "")
    if mt not in ARCHS:
        arch = ", ".join(raw.get("architectures") or []) or mt or "unknown"
        raise ValueError(f"architecture {arch!r} (model_type {mt!r}) is not supported: "
                         f"shardwise runs {', '.join(ARCHS)}")
    return ARCHS[mt]


def _get(raw: Mapping[str, Any], fam: ArchSpec, key: str) -> Any:
    return raw[key] if key in raw else fam.defaults.get(key)


def _rope_block(raw: Mapping[str, Any], fam: ArchSpec) -> tuple[dict, dict]:
    """(the global layers' rope block, the window layers' one) in either key style."""
    block = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    nested = sorted(k for k, v in block.items() if isinstance(v, Mapping))
    if not nested:
        return block, {}
    if not fam.local_rope:
        raise ValueError(f"rope parameters per layer type ({', '.join(nested)}) are not supported "
                         f"for model_type {fam.model_type!r}")
    params = raw.get("rope_parameters") or {}
    local = dict(params.get("sliding_attention") or {})
    full = dict(params.get("full_attention") or {})
    if raw.get("rope_scaling"):  # 4.x scaling on top of a 5.x block: the global layers'
        full.update(raw["rope_scaling"])
    return full, local


def read_rope(raw: Mapping[str, Any], fam: ArchSpec) -> dict[str, Any]:
    """``rope_theta``, ``rope_scaling`` (``None`` for plain rope, else ``{"rope_type": ...,
    <its parameters>}``), ``partial_rotary_factor`` and ``rope_local_theta`` from either key
    style. Raises for what the decoder does not run."""
    block, local = _rope_block(raw, fam)
    theta = float(block.get("rope_theta", _get(raw, fam, "rope_theta")))
    partial = block.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    partial = 1.0 if partial is None else float(partial)
    if partial != 1.0 and not fam.partial_rotary:
        raise ValueError(f"partial_rotary_factor={partial} is not supported for model_type "
                         f"{fam.model_type!r}: rope rotates the whole head here")
    kind = block.get("rope_type", block.get("type", "default"))
    if fam.partial_rotary and kind in ("su", "yarn"):  # Phi-3's old names (transformers' rule)
        kind = "longrope"
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope type {kind!r} is not supported (supported: "
                         f"{', '.join(ROPE_TYPES)})")
    if kind in ("llama3", "longrope"):
        if "original_max_position_embeddings" in raw:
            block["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
        block.setdefault("original_max_position_embeddings",
                         _get(raw, fam, "max_position_embeddings"))
    missing = [k for k in ROPE_TYPES[kind] if block.get(k) is None]
    if missing:
        raise ValueError(f"rope type {kind!r} needs {', '.join(missing)} in the config")
    out: dict[str, Any] = {"rope_theta": theta, "rope_scaling": None,
                           "partial_rotary_factor": partial, "rope_local_theta": None}
    if kind != "default":
        keys = ROPE_TYPES[kind] + (LONGROPE_OPTIONAL if kind == "longrope" else ())
        out["rope_scaling"] = {"rope_type": kind,
                               **{k: block[k] for k in keys if block.get(k) is not None}}
    if fam.local_rope:
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"rope type {local['rope_type']!r} on sliding-window layers is not "
                             "supported (default only)")
        out["rope_local_theta"] = float(local.get("rope_theta",
                                                  _get(raw, fam, "rope_local_base_freq")))
    return out


def read_window(raw: Mapping[str, Any], fam: ArchSpec, num_layers: int) -> dict[str, Any]:
    """``sliding_window`` (tokens; ``None`` when no layer slides) and ``layer_types`` (``None``
    when every layer slides) by the family's rule (``ArchSpec.window``)."""
    none = {"sliding_window": None, "layer_types": None}
    window, types = _get(raw, fam, "sliding_window"), raw.get("layer_types")
    if fam.window == "none" or window is None:
        return none
    if fam.window == "gated":
        if not _get(raw, fam, "use_sliding_window"):
            return none
        if types is None:  # 4.x: layers from max_window_layers on slide
            start = _get(raw, fam, "max_window_layers")
            types = [LAYER_TYPES[i >= start] for i in range(num_layers)]
    elif fam.window == "layer_types" and types is None:  # 4.x: every n-th layer is global
        n = raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern",
                                                      fam.window_pattern))
        types = [LAYER_TYPES[bool((i + 1) % n)] for i in range(num_layers)]
    if types is not None and "sliding_attention" not in types:
        return none
    every = types is None or set(types) == {"sliding_attention"}
    return {"sliding_window": int(window), "layer_types": None if every else tuple(types)}


def read_hf_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :class:`shardwise.models.config.LlamaConfig` for a config.json
    of either key style (see the module docstring). Raises ``ValueError`` naming what is missing
    or not supported."""
    raw = language_model_config(raw)
    fam = family_of(raw)
    missing = [k for k in SHAPE_KEYS if raw.get(k) is None]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    act = raw.get("hidden_activation") or _get(raw, fam, "hidden_act")
    if act not in fam.activations:
        raise ValueError(f"hidden_act {act!r} is not supported for {fam.model_type} "
                         f"(supported: {', '.join(fam.activations)})")
    if raw.get("mlp_bias"):
        raise ValueError("MLP biases (mlp_bias=true) are not supported")
    heads = raw["num_attention_heads"]
    head_dim = _get(raw, fam, "head_dim")
    if head_dim is not None and raw["hidden_size"] % heads == 0 \
            and head_dim == raw["hidden_size"] // heads:
        head_dim = None  # the default: hidden / heads
    bias = fam.attention_bias if fam.attention_bias is not None \
        else bool(_get(raw, fam, "attention_bias"))
    out = dict(
        model_type=fam.model_type, **{k: raw[k] for k in SHAPE_KEYS},
        num_key_value_heads=_get(raw, fam, "num_key_value_heads") or heads, head_dim=head_dim,
        rms_norm_eps=_get(raw, fam, "rms_norm_eps"), hidden_act=act,
        max_position_embeddings=_get(raw, fam, "max_position_embeddings"),
        tie_word_embeddings=bool(_get(raw, fam, "tie_word_embeddings")), attention_bias=bias,
        initializer_range=_get(raw, fam, "initializer_range"),
        bos_token_id=_get(raw, fam, "bos_token_id"), eos_token_id=_get(raw, fam, "eos_token_id"),
        pad_token_id=_get(raw, fam, "pad_token_id"),
        **read_rope(raw, fam), **read_window(raw, fam, raw["num_hidden_layers"]))
    if fam.norm_offset:  # Gemma
        out["query_pre_attn_scalar"] = _get(raw, fam, "query_pre_attn_scalar")
    if fam.attn_softcap:
        out["attn_logit_softcapping"] = _get(raw, fam, "attn_logit_softcapping")
    if fam.final_softcap:
        out["final_logit_softcapping"] = _get(raw, fam, "final_logit_softcapping")
    if fam.mlp == "moe":
        out.update(read_experts(raw, fam))
    return out


def _experts_key(fam: ArchSpec) -> str:
    return "num_local_experts" if "num_local_experts" in fam.defaults else "num_experts"


def read_experts(raw: Mapping[str, Any], fam: ArchSpec) -> dict[str, Any]:
    """A mixture of experts' keys (either spelling of the expert count); refuses what the MoE
    block does not run: router jitter (a random factor in training), Qwen3-MoE's window."""
    n = raw.get("num_local_experts", raw.get("num_experts", fam.defaults.get(_experts_key(fam))))
    jitter = _get(raw, fam, "router_jitter_noise") or 0.0
    if jitter:
        raise ValueError(f"router_jitter_noise={jitter} is not supported (a random factor on "
                         "the router's input in training); set it to 0")
    if fam.window == "none" and raw.get("use_sliding_window"):
        raise ValueError(f"use_sliding_window=true is not supported for {fam.model_type}")
    norm = fam.router_norm if fam.router_norm is not None \
        else bool(_get(raw, fam, "norm_topk_prob"))
    out = dict(num_experts=int(n), num_experts_per_tok=int(_get(raw, fam, "num_experts_per_tok")),
               moe_intermediate_size=_get(raw, fam, "moe_intermediate_size"),
               norm_topk_prob=norm,
               router_aux_loss_coef=float(_get(raw, fam, "router_aux_loss_coef")),
               decoder_sparse_step=int(_get(raw, fam, "decoder_sparse_step") or 1),
               mlp_only_layers=tuple(_get(raw, fam, "mlp_only_layers") or ()))
    if fam.clip_qkv:
        out["clip_qkv"] = _get(raw, fam, "clip_qkv")
    return out


def expert_keys(c: Any) -> dict[str, Any]:
    """The mixture of experts in the family's keys (the block's shape, its routing and its
    load-balancing loss's weight)."""
    fam = ARCHS[c.model_type]
    out: dict[str, Any] = {_experts_key(fam): c.num_experts,
                           "num_experts_per_tok": c.num_experts_per_tok,
                           "router_aux_loss_coef": c.router_aux_loss_coef}
    if fam.router_norm is None:
        out["norm_topk_prob"] = c.norm_topk_prob
    if "moe_intermediate_size" in fam.defaults and fam.defaults["moe_intermediate_size"]:
        out.update(moe_intermediate_size=c.expert_width, decoder_sparse_step=c.decoder_sparse_step,
                   mlp_only_layers=list(c.mlp_only_layers))
    if fam.clip_qkv:
        out["clip_qkv"] = c.clip_qkv
    return out


def rope_keys(theta: float, scaling: Mapping[str, Any] | None, *, partial: float | None = None,
              local_theta: float | None = None) -> dict[str, Any]:
    """Rope settings in both key styles: ``rope_theta`` + ``rope_scaling`` (+ Phi-3's
    ``partial_rotary_factor`` and ``original_max_position_embeddings``, Gemma 3's
    ``rope_local_base_freq``) for 4.x, ``rope_parameters`` for 5.x (per layer type when the
    window layers have a base of their own)."""
    params: dict[str, Any] = {"rope_theta": theta, **(scaling or {"rope_type": "default"})}
    out: dict[str, Any] = {"rope_theta": theta, "rope_scaling": dict(scaling) if scaling else None}
    if partial is not None:
        out["partial_rotary_factor"] = params["partial_rotary_factor"] = partial
    if scaling and "original_max_position_embeddings" in scaling and scaling["rope_type"] == \
            "longrope":
        out["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    if local_theta is not None:
        out["rope_local_base_freq"] = local_theta
        params = {"full_attention": params,
                  "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}
    out["rope_parameters"] = params
    return out


def window_keys(c: Any) -> dict[str, Any]:
    """The window in the family's keys, 4.x and 5.x (``layer_types``) alike."""
    fam, w, n = ARCHS[c.model_type], c.sliding_window, c.num_hidden_layers
    types = list(c.layer_types) if c.layer_types else [LAYER_TYPES[w is not None]] * n
    if fam.window == "all":
        return {"sliding_window": w}  # null matters: Mistral's default is 4096
    if fam.window == "gated":
        first = types.index("sliding_attention") if w is not None else n
        return {"use_sliding_window": w is not None, "sliding_window": w,
                "max_window_layers": first, "layer_types": types}
    if fam.window == "layer_types":
        out: dict[str, Any] = {"sliding_window": w, "layer_types": types}
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        period = full[0] + 1 if full else 0
        if period and types == [LAYER_TYPES[bool((i + 1) % period)] for i in range(n)]:
            out["sliding_window_pattern"] = period  # what transformers 4.x reads
        return out
    return {}


def write_hf_config(c: Any) -> dict[str, Any]:
    """config.json contents for a :class:`~shardwise.models.config.LlamaConfig` that
    transformers 4.x and 5.x both read back as the model this library runs."""
    fam = ARCHS[c.model_type]
    out: dict[str, Any] = {
        "architectures": [fam.hf_class], "model_type": c.model_type,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.dim_per_head,
        "hidden_act": c.hidden_act, "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "initializer_range": c.initializer_range, "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id, "torch_dtype": "float32",
        **rope_keys(c.rope_theta, c.rope_scaling,
                    partial=c.partial_rotary_factor if fam.partial_rotary else None,
                    local_theta=(c.rope_local_theta or c.rope_theta) if fam.local_rope else None),
        **window_keys(c)}
    if fam.attention_bias is None:
        out["attention_bias"] = c.attention_bias
    if fam.norm_offset:  # Gemma's names for its settings
        out.update(hidden_activation=c.hidden_act,
                   query_pre_attn_scalar=c.query_pre_attn_scalar or c.dim_per_head)
    if fam.attn_softcap:
        out["attn_logit_softcapping"] = c.attn_logit_softcapping
    if fam.final_softcap:
        out["final_logit_softcapping"] = c.final_logit_softcapping
    if fam.mlp == "moe":
        out.update(expert_keys(c))
    return out
