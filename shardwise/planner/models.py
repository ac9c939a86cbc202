"""Transformer shapes for the planner: parameter counts and what one tensor-parallel rank holds.

A decoder layer with hidden size h, q = heads x head_dim, k = kv_heads x head_dim, FFN width f:

    attention   W_q (h x q) + W_k, W_v (h x k each) + W_o (q x h)   = 2 h q + 2 h k
    MLP         gated (SwiGLU: gate, up, down) 3 h f;  GeLU MLP 2 h f
    norms       2 per layer: h each (RMSNorm) or 2 h (LayerNorm with bias)
    biases      "qkv" (Qwen2): q + 2k;  "all" (GPT): q + 2k + h + f + h

plus embeddings V h (+ learned positions s h), a final norm, and an output head V h unless tied.
For GPT (q = k = h, f = 4h, biases, LayerNorm) this is Narayanan et al. 2021's
P = 12 l h^2 (1 + 13 / (12 h) + (V + s) / (12 l h)) plus the final LayerNorm's 2h.

A mixture of experts (Mixtral, Qwen3-MoE, OLMoE) replaces the MLP by E experts of width f (each a
gated MLP, 3 h f) and a router (E h); a token runs k of them, so the *active* parameters count k
experts per layer where the total counts E. q/k norms add 2 hd per layer ("head": one weight per
head dimension, Qwen3) or q + k ("full": over all heads, OLMoE).

Under tensor parallelism t, query heads split as evenly as possible (9 on 2 ranks -> 5 + 4), KV heads
are sharded when t divides them and otherwise each rank keeps the KV heads its query heads use, the
FFN splits into ceil(f / t) columns and the vocabulary pads to a multiple of t. Norms are replicated.
Experts (``shardwise.models.moe``): each is split over ``etp`` ranks of its TP group (ceil(f / etp)
columns), and E experts over ``ep x t / etp`` slots (ceil(E / slots) on the busiest rank); the
router is replicated.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace

from ..partition import split_sizes


@dataclass(frozen=True)
class ModelSpec:
    """One decoder-only transformer. ``source`` says where the numbers come from."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    head_dim: int = 0  # 0 means hidden // heads
    gated_mlp: bool = True  # SwiGLU (3 matrices) vs GeLU MLP (2)
    tied_embeddings: bool = False
    bias: str = "none"  # "none" | "qkv" | "all"
    norm: str = "rms"  # "rms" | "layer"
    positions: int = 0  # learned position-embedding rows (GPT); 0 for rotary models
    seq_len: int = 4096  # pre-training context: the default --seq-len when training
    dropout: bool = False  # trained with dropout (stores 1-byte masks; Korthikanti et al.)
    source: str = ""
    published_params: float | None = None  # the exact or printed count from ``source``
    experts: int = 0  # routed experts per layer (0: a dense MLP); ffn is then each expert's width
    top_k: int = 0  # experts each token runs
    qk_norm: str = "none"  # "none" | "head" (RMSNorm per q/k head: Qwen3) | "full" (OLMoE)
    published_active: float | None = None  # active parameters per token, as ``source`` prints

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    # -- shapes ----------------------------------------------------------------------------
    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    # -- parameter counts -------------------------------------------------------------------
    def norm_params(self) -> int:
        return self.hidden * (2 if self.norm == "layer" else 1)

    def attn_params(self, q: int | None = None, k: int | None = None) -> int:
        q = self.q_dim if q is None else q
        k = self.kv_dim if k is None else k
        w = 2 * self.hidden * q + 2 * self.hidden * k
        if self.bias in ("qkv", "all"):
            w += q + 2 * k
        return w

    def expert_params(self, f: int | None = None) -> int:
        """One dense MLP, or one expert, of width ``f`` (default ffn)."""
        f = self.ffn if f is None else f
        return (3 if self.gated_mlp else 2) * self.hidden * f

    def router_params(self) -> int:
        return self.experts * self.hidden

    def mlp_params(self, f: int | None = None, experts: int | None = None) -> int:
        """The MLP of a layer: dense, or ``experts`` (default all) experts plus the router."""
        if not self.is_moe:
            return self.expert_params(f)
        n = self.experts if experts is None else experts
        return n * self.expert_params(f) + self.router_params()

    def qk_norm_params(self, q: int | None = None, k: int | None = None) -> int:
        if self.qk_norm == "head":
            return 2 * self.hd
        if self.qk_norm == "full":
            return (self.q_dim if q is None else q) + (self.kv_dim if k is None else k)
        return 0

    def bias_params_rest(self) -> int:
        """Biases of W_o and the MLP (GPT only): h + f + h."""
        return 2 * self.hidden + self.ffn if self.bias == "all" else 0

    def layer_params(self) -> int:
        return (self.attn_params() + self.mlp_params() + 2 * self.norm_params()
                + self.bias_params_rest() + self.qk_norm_params())

    def embedding_params(self) -> int:
        return self.vocab * self.hidden + self.positions * self.hidden

    def head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def total_params(self) -> int:
        """All parameters, counted from the shapes (final norm included)."""
        return (self.layers * self.layer_params() + self.embedding_params() + self.head_params()
                + self.norm_params())

    def non_embedding_params(self) -> int:
        """Total minus input embeddings and untied output head (Qwen model cards' convention)."""
        return self.total_params() - self.vocab * self.hidden - self.head_params()

    def active_params(self) -> int:
        """Parameters a token runs through: the total less the experts it skips."""
        skipped = self.experts - self.top_k if self.is_moe else 0
        return self.total_params() - self.layers * skipped * self.expert_params()

    def matmul_params_per_layer(self) -> int:
        """Weights that multiply each token (the 2 N FLOPs-per-token rule counts these): for a
        mixture of experts the router and the k experts a token runs."""
        mlp = self.mlp_params(experts=self.top_k) if self.is_moe else self.mlp_params()
        return 2 * self.hidden * self.q_dim + 2 * self.hidden * self.kv_dim + mlp


# -- what one TP rank holds ------------------------------------------------------------------
def heads_per_rank(m: ModelSpec, tp: int) -> int:
    """Most query heads on any rank."""
    return max(split_sizes(m.heads, tp, empty_ok=True))


def kv_heads_per_rank(m: ModelSpec, tp: int) -> int:
    """Most KV heads on any rank: kv/t when t divides kv, else the KV heads a rank's queries use.

    For t a multiple of kv this is 1 (each KV head replicated t/kv times, vLLM's rule).
    """
    if m.kv_heads % tp == 0:
        return m.kv_heads // tp
    group = m.heads // m.kv_heads  # query heads per KV head
    most, start = 0, 0
    for n in split_sizes(m.heads, tp, empty_ok=True):
        if n:
            most = max(most, (start + n - 1) // group - start // group + 1)
        start += n
    return most


def tp_problem(m: ModelSpec, tp: int) -> str | None:
    """Why ``tp`` cannot shard this model, or None."""
    if tp > m.heads:
        return f"tp={tp} but the model has {m.heads} query heads: use tp <= {m.heads}"
    if m.heads % m.kv_heads:
        return f"{m.heads} query heads do not group evenly over {m.kv_heads} KV heads"
    return None


def expert_slots(m: ModelSpec, tp: int, ep: int = 1, etp: int | None = None) -> int:
    """Ranks' worth of different experts: ``ep x tp / etp`` (1 for a dense model)."""
    return ep * tp // (etp or tp) if m.is_moe else 1


def experts_per_rank(m: ModelSpec, tp: int, ep: int = 1, etp: int | None = None) -> int:
    """Experts on the busiest rank (8 on 3 slots: 3)."""
    return math.ceil(m.experts / expert_slots(m, tp, ep, etp))


def moe_problem(m: ModelSpec, tp: int, ep: int, etp: int | None) -> str | None:
    """Why this expert placement cannot work, or None."""
    if not m.is_moe:
        return f"ep={ep}: {m.name} has no experts" if ep > 1 else None
    e = etp or tp
    if tp % e:
        return f"expert tp={e} does not divide tp={tp}"
    slots = expert_slots(m, tp, ep, etp)
    if slots > m.experts:
        return (f"ep={ep} x tp/expert-tp={tp // e} = {slots} expert slots but {m.experts} "
                f"experts: each slot needs one")
    if e > m.ffn:
        return f"expert tp={e} but each expert has {m.ffn} columns"
    return None


def _mlp_per_rank(m: ModelSpec, tp: int, ep: int, etp: int | None, experts: float) -> float:
    if not m.is_moe:
        return m.mlp_params(math.ceil(m.ffn / tp))
    return experts * m.expert_params(math.ceil(m.ffn / (etp or tp))) + m.router_params()


def layer_params_per_rank(m: ModelSpec, tp: int, ep: int = 1, etp: int | None = None) -> int:
    """Parameters of one layer held by the busiest rank (norms and the router replicated).
    ``ep`` / ``etp``: the expert placement (module docstring)."""
    q = heads_per_rank(m, tp) * m.hd
    k = kv_heads_per_rank(m, tp) * m.hd
    f = math.ceil(m.ffn / tp)
    rest = (2 * m.hidden + f) if m.bias == "all" else 0  # W_o and MLP-out biases kept on every rank
    mlp = _mlp_per_rank(m, tp, ep, etp, experts_per_rank(m, tp, ep, etp))
    norms = m.qk_norm_params(q, k)
    return int(m.attn_params(q, k) + mlp + 2 * m.norm_params() + rest + norms)


def matmul_params_per_rank(m: ModelSpec, tp: int, ep: int = 1, etp: int | None = None, *,
                           held: bool = False) -> float:
    """Weights one rank multiplies per token of its TP group in one layer; for experts the
    average share of a token's k experts (k etp / t experts, f / etp columns each: the EP
    group's rows spread over its slots); ``held``: every matmul weight the rank holds."""
    q = heads_per_rank(m, tp) * m.hd
    k = kv_heads_per_rank(m, tp) * m.hd
    n = experts_per_rank(m, tp, ep, etp) if held else \
        m.top_k * (etp or tp) / tp if m.is_moe else 0
    return 2 * m.hidden * q + 2 * m.hidden * k + _mlp_per_rank(m, tp, ep, etp, n)


def vocab_rows_per_rank(m: ModelSpec, tp: int) -> int:
    """Vocabulary rows per rank after padding V up to a multiple of tp."""
    return math.ceil(m.vocab / tp)


def layers_per_stage(m: ModelSpec, pp: int) -> int:
    """Layers on the busiest pipeline stage."""
    return math.ceil(m.layers / pp)


# -- Hugging Face config.json --------------------------------------------------------------
QK_NORMS = {"qwen3": "head", "qwen3_moe": "head", "gemma3_text": "head", "olmoe": "full"}
_GPT2_KEYS = {"hidden": "n_embd", "layers": "n_layer", "heads": "n_head"}
_LLAMA_KEYS = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
               "ffn": "intermediate_size", "vocab": "vocab_size"}


def from_hf_config(path: str) -> ModelSpec:
    """Read an HF ``config.json`` (Llama, Mistral, Qwen2, SmolLM, GPT-2 families) with ``json``."""
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read model config {path!r}: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) or "config"
    kind = cfg.get("model_type", "llama")
    keys = _GPT2_KEYS if kind == "gpt2" else _LLAMA_KEYS
    missing = [v for v in keys.values() if v not in cfg]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)} (model_type={kind!r})")
    if kind == "gpt2":
        h = cfg["n_embd"]
        return ModelSpec(name=name, hidden=h, layers=cfg["n_layer"], heads=cfg["n_head"],
                         kv_heads=cfg["n_head"], ffn=cfg.get("n_inner") or 4 * h,
                         vocab=cfg.get("vocab_size", 50257), gated_mlp=False, tied_embeddings=True,
                         bias="all", norm="layer", positions=cfg.get("n_positions", 1024),
                         seq_len=cfg.get("n_positions", 1024), dropout=True, source=path)
    bias = "qkv" if kind == "qwen2" or cfg.get("attention_bias") else "none"
    heads = cfg["num_attention_heads"]
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    ffn = cfg.get("moe_intermediate_size") or cfg["intermediate_size"] if experts \
        else cfg["intermediate_size"]
    if experts and (cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1
                    or cfg.get("shared_expert_intermediate_size")):
        raise ValueError(f"{path}: dense layers between MoE layers and shared experts are not "
                         "modelled (every layer is a mixture of experts here)")
    spec = ModelSpec(
        name=name, hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads, ffn=ffn,
        vocab=cfg["vocab_size"], head_dim=cfg.get("head_dim") or 0,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)), bias=bias,
        seq_len=min(cfg.get("max_position_embeddings", 4096), 8192),
        dropout=bool(cfg.get("attention_dropout", 0.0)), source=path,
        experts=experts if experts > 1 else 0,
        top_k=cfg.get("num_experts_per_tok", 0) if experts > 1 else 0,
        qk_norm=QK_NORMS.get(kind, "none"))
    if cfg.get("mlp_bias"):
        raise ValueError(f"{path}: mlp_bias=true is not modelled")
    return spec


def with_name(m: ModelSpec, name: str) -> ModelSpec:
    return replace(m, name=name)
