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
sliding window         ``sliding_window`` (+ Qwen2's      the same, plus ``layer_types``
                       ``use_sliding_window``,            (``"sliding_attention"`` per layer)
                       ``max_window_layers``)
====================== ================================== ======================================

Precedence: ``rope_scaling`` (when not null) replaces ``rope_parameters``; a ``rope_theta`` inside
the block wins over the top-level one; a top-level ``original_max_position_embeddings`` wins
over the block's (Phi-3 writes it there), which defaults to ``max_position_embeddings``. Keys a
file omits take the family's transformers default (``Family.defaults``: e.g. every supported
family defaults to untied embeddings, Mistral to a 4096-token window).

:func:`write_hf_config` writes both styles at once (``rope_theta`` + ``rope_scaling`` for 4.x,
``rope_parameters`` for 5.x, consistent with each other), so either version reads back the model
this library runs.

A family is data (:class:`Family`, registered in :data:`FAMILIES`). To add one: register its
``model_type``, HF class and transformers defaults; a feature the decoder does not run yet is
refused here with the numbers (a per-layer-type ``rope_parameters`` block as Gemma 3 writes it;
``partial_rotary_factor`` < 1 as Phi-3 writes it), so that the new family's reader has one place
to grow. Nothing else in the library reads config keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

ROPE_TYPES: dict[str, tuple[str, ...]] = {  # supported rope types -> their parameters
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads")


@dataclass(frozen=True)
class Family:
    """One architecture family as transformers defines its config.

    ``attention_bias``: fixed by the architecture (Qwen2: q/k/v always have a bias; Mistral:
    never), or ``None`` when the ``attention_bias`` key decides (Llama). ``window``: ``"none"``
    (no sliding window), ``"all"`` (every layer, when ``sliding_window`` is set: Mistral) or
    ``"gated"`` (``use_sliding_window`` switches it on for layers >= ``max_window_layers``:
    Qwen2). ``defaults``: transformers' values for keys a config.json may omit.
    """

    model_type: str
    hf_class: str
    attention_bias: bool | None
    window: str
    defaults: Mapping[str, Any] = field(default_factory=dict)


_COMMON = {"rms_norm_eps": 1e-6, "initializer_range": 0.02, "tie_word_embeddings": False,
           "hidden_act": "silu", "rope_theta": 10000.0}
FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


register(Family("llama", "LlamaForCausalLM", None, "none",
                {**_COMMON, "max_position_embeddings": 2048, "num_key_value_heads": None,
                 "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False,
                 "mlp_bias": False}))
register(Family("mistral", "MistralForCausalLM", False, "all",
                {**_COMMON, "max_position_embeddings": 4096 * 32, "num_key_value_heads": 8,
                 "bos_token_id": 1, "eos_token_id": 2, "sliding_window": 4096}))
register(Family("qwen2", "Qwen2ForCausalLM", True, "gated",
                {**_COMMON, "max_position_embeddings": 32768, "num_key_value_heads": 32,
                 "bos_token_id": None, "eos_token_id": None, "use_sliding_window": False,
                 "sliding_window": 4096, "max_window_layers": 28}))


def family_of(raw: Mapping[str, Any]) -> Family:
    mt = raw.get("model_type", "")
    if mt not in FAMILIES:
        arch = ", ".join(raw.get("architectures") or []) or mt or "unknown"
        raise ValueError(f"architecture {arch!r} (model_type {mt!r}) is not supported: "
                         f"shardwise runs {', '.join(FAMILIES)}")
    return FAMILIES[mt]


def _get(raw: Mapping[str, Any], fam: Family, key: str) -> Any:
    return raw[key] if key in raw else fam.defaults.get(key)


def read_rope(raw: Mapping[str, Any], fam: Family) -> tuple[float, dict[str, Any] | None]:
    """``(theta, scaling)`` from either key style; ``scaling`` is ``None`` for plain rope, else
    ``{"rope_type": ..., <its parameters>}``. Raises for what the decoder does not run."""
    block = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    nested = sorted(k for k, v in block.items() if isinstance(v, Mapping))
    if nested:
        raise ValueError(f"rope parameters per layer type ({', '.join(nested)}) are not supported "
                         f"for model_type {fam.model_type!r}")
    theta = float(block.get("rope_theta", _get(raw, fam, "rope_theta")))
    partial = block.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported for model_type "
                         f"{fam.model_type!r}: rope rotates the whole head here")
    kind = block.get("rope_type", block.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope type {kind!r} is not supported (supported: "
                         f"{', '.join(ROPE_TYPES)})")
    if kind == "llama3":
        if "original_max_position_embeddings" in raw:
            block["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
        block.setdefault("original_max_position_embeddings",
                         _get(raw, fam, "max_position_embeddings"))
    missing = [k for k in ROPE_TYPES[kind] if block.get(k) is None]
    if missing:
        raise ValueError(f"rope type {kind!r} needs {', '.join(missing)} in the config")
    if kind == "default":
        return theta, None
    return theta, {"rope_type": kind, **{k: block[k] for k in ROPE_TYPES[kind]}}


def read_window(raw: Mapping[str, Any], fam: Family, num_layers: int) -> int | None:
    """The sliding window (tokens) when any layer slides, else ``None``."""
    window = _get(raw, fam, "sliding_window")
    if fam.window == "none" or window is None:
        return None
    if fam.window == "gated":
        if not _get(raw, fam, "use_sliding_window"):
            return None
        types = raw.get("layer_types")  # 5.x writes the per-layer pattern
        slides = "sliding_attention" in types if types is not None \
            else _get(raw, fam, "max_window_layers") < num_layers
        if not slides:
            return None
    return int(window)


def read_hf_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :class:`shardwise.models.config.LlamaConfig` for a config.json
    of either key style (see the module docstring). Raises ``ValueError`` naming what is missing
    or not supported."""
    fam = family_of(raw)
    missing = [k for k in SHAPE_KEYS if raw.get(k) is None]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    act = _get(raw, fam, "hidden_act")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (the Llama family uses 'silu')")
    if raw.get("mlp_bias"):
        raise ValueError("MLP biases (mlp_bias=true) are not supported")
    heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim")
    if head_dim is not None and raw["hidden_size"] % heads == 0 \
            and head_dim == raw["hidden_size"] // heads:
        head_dim = None  # the default: hidden / heads
    theta, scaling = read_rope(raw, fam)
    window = read_window(raw, fam, raw["num_hidden_layers"])
    positions = _get(raw, fam, "max_position_embeddings")
    bias = fam.attention_bias if fam.attention_bias is not None \
        else bool(_get(raw, fam, "attention_bias"))
    return dict(
        model_type=fam.model_type, **{k: raw[k] for k in SHAPE_KEYS},
        num_key_value_heads=_get(raw, fam, "num_key_value_heads") or heads, head_dim=head_dim,
        rms_norm_eps=_get(raw, fam, "rms_norm_eps"), rope_theta=theta, rope_scaling=scaling,
        sliding_window=window,
        max_position_embeddings=min(positions, window) if window else positions,
        tie_word_embeddings=bool(_get(raw, fam, "tie_word_embeddings")), attention_bias=bias,
        initializer_range=_get(raw, fam, "initializer_range"),
        bos_token_id=_get(raw, fam, "bos_token_id"), eos_token_id=_get(raw, fam, "eos_token_id"))


def rope_keys(theta: float, scaling: Mapping[str, Any] | None) -> dict[str, Any]:
    """Rope settings in both key styles: ``rope_theta`` + ``rope_scaling`` (4.x) and
    ``rope_parameters`` (5.x)."""
    params = dict(scaling or {"rope_type": "default"})
    return {"rope_theta": theta, "rope_scaling": dict(scaling) if scaling else None,
            "rope_parameters": {"rope_theta": theta, **params}}


def write_hf_config(c: Any) -> dict[str, Any]:
    """config.json contents for a :class:`~shardwise.models.config.LlamaConfig` that
    transformers 4.x and 5.x both read back as the model this library runs."""
    fam = FAMILIES[c.model_type]
    out: dict[str, Any] = {
        "architectures": [fam.hf_class], "model_type": c.model_type,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.dim_per_head,
        "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "initializer_range": c.initializer_range, "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
        "torch_dtype": "float32", **rope_keys(c.rope_theta, c.rope_scaling)}
    if fam.attention_bias is None:
        out["attention_bias"] = c.attention_bias
    if fam.window == "all":
        out["sliding_window"] = c.sliding_window  # null matters: Mistral's default is 4096
    elif fam.window == "gated":
        out.update(use_sliding_window=c.sliding_window is not None,
                   sliding_window=c.sliding_window, max_window_layers=0)
    return out
