"""Bytes per GPU: weights, gradients, Adam states, activations, KV cache and a stated overhead.

Training, as ``shardwise train`` runs it: fp32 weights (4 B/param), fp32 gradients (4 B), AdamW
m and v in fp32 (8 B); with ``--precision bf16`` (or fp16) matmuls run under autocast, which keeps
a 16-bit copy of every matmul weight of the stage while forward and backward run (2 B per matmul
weight, counted with the weights). ZeRO-1 divides the AdamW states by dp, ZeRO-2 the gradients
too (Rajbhandari et al. 2020; the fp32 weights stay whole on every rank).

Activations of the Llama family as the trainer stores them (``shardwise.models.llama``: RMSNorm,
rope, SwiGLU, no dropout, attention through ``scaled_dot_product_attention``, so no s x s scores
are stored), per layer, per micro-batch, on one TP rank, in bytes per token (T = s b tokens).
A = 2 under 16-bit autocast, 4 in fp32 (matmul outputs and inputs); R = 4 (the residual stream
and the normalised values stay fp32); q, k: the rank's query and KV widths (heads x head_dim),
f its FFN columns, a its query heads; sigma = t with sequence parallelism, else 1::

    none       2R h/sigma   layer input x and residual h
             + 2R h/sigma   x / rms(x) inside each RMSNorm (and 2R/sigma for the 1/rms(x))
             + 2A h         QKV and gate/up inputs (under SP: the all-gathered sequence)
             + A 4q         rope'd q, K and V expanded to q's heads, attention output (the head
                            merge is a view of it: flash kernels write (b, s, heads, d))
                            (A (3q + 3k) when a rank's query and KV heads are as many: no
                            expansion, rope'd k and the QKV output instead)
             + 4a           attention log-sum-exp (fp32)
             + A 4f         gate/up output (2f), silu(gate), silu(gate) x up
    selective  2R h/sigma + A (q + 2k) + A q + 4a + A 2f  (+ 2A h under SP)
               (norm outputs, rope, K/V expansion and SwiGLU rebuilt in backward)
    full       R h/sigma    (the layer input; one layer's "none" set rebuilt during its backward:
                            ``recompute_workspace``)

Per micro-batch and stage: rope's cos and sin (2 R hd), token ids (8, and a 4 B mask at tp > 1)
on the first stage; on the last the final norm (as a layer's first norm) and the cross-entropy's
fp32 softmax numerators 4 V/t plus 22 B of per-token statistics. Under 1F1B the first stage
holds min(p, m) micro-batches in flight, the last one.

Models outside that family (GPT: LayerNorm, dropout, GeLU MLP) follow Korthikanti et al. 2022,
Table 2, as Megatron-LM stores them (16-bit values, 1-byte dropout masks)::

    no parallelism                        s b h (34 + 5 a s / h)
    tensor parallel                       s b h (10 + 24 / t + 5 a s / (h t))
    tensor + sequence parallel            s b h / t (34 + 5 a s / h)
    selective recomputation (+ SP)        s b h (10 + 24 / t)      (34 s b h / t)
    full recomputation                    2 s b h                  (2 s b h / t)

generalised to GQA (K and V narrower than Q) and gated MLPs; for GPT shapes it equals the table.

With 1F1B pipelining the first stage holds min(p, m) micro-batches of activations (times
1 + (p-1)/(p v) with v interleaved model chunks, Korthikanti et al. 2022 section 4.2.3).

KV cache per token per GPU: 2 x (layers / pp) x (KV heads per rank) x head_dim x bytes.

Serving weights at 16 or 8 bits (fp8): bytes per weight, embeddings and head in 16 bits. At int8
and int4 (weight-only, ``shardwise.quant``): what shardwise's loader holds on the busiest rank,
matrix by matrix (:func:`shardwise.quant.grid.kernel_bytes`): int8 values with a 16-bit scale
per kernel group (or per output row with group 0); int4 two values per byte with a 16-bit scale
and zero point per kernel group (the group, or the largest of 32/64/128/256 dividing it and the
rank's columns: SmolLM2's hidden size 576 runs groups of 128 as 64); the embedding and an untied
head at int8 in the same groups, norms in 16 bits.

Mixtures of experts (``moe.py``): a rank holds its slot's experts (ceil(E / slots), each f / etp
columns) and the router; the MLP's activations are the MoE formula of ``moe.py`` instead of
``A 4f``. With ep > 1 the TP groups of an EP group run different sequences: the KV cache of a
serving rank holds batch / ep of them.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from . import moe
from ..quant.config import DEFAULT_GROUP
from ..quant.grid import kernel_bytes
from ..partition import split_sizes
from .models import (ModelSpec, heads_per_rank, kv_heads_per_rank, layer_params_per_rank,
                     layers_per_stage, matmul_params_per_rank, vocab_rows_per_rank)

GiB = 2**30
RUNTIME_BYTES = 1 * GiB  # CUDA context, cuBLAS workspace, NCCL buffers
FRAGMENTATION = 0.05  # of GPU capacity, kept free for the caching allocator
# Bytes per weight. int4: group-wise (128) fp16 scale and zero point add 4 / 128 B (AWQ/GPTQ style).
WEIGHT_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5 + 4 / 128}
RECOMPUTE = ("none", "selective", "full")
TRAIN_PRECISION = ("bf16", "fp16", "fp32")  # fp32 weights and AdamW; 16-bit autocast or none


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU on the busiest rank."""

    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    recompute_workspace: float = 0.0  # one layer rebuilt in backward (full recomputation)
    kv_cache: float = 0.0
    overhead: float = 0.0

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    def gib(self) -> dict[str, float]:
        out = {f.name: round(getattr(self, f.name) / GiB, 3) for f in fields(self)}
        out["total"] = round(self.total / GiB, 3)
        return out


def overhead_bytes(capacity: float) -> float:
    """1 GiB runtime + 5% of capacity for allocator fragmentation."""
    return RUNTIME_BYTES + FRAGMENTATION * capacity


def matrix_bytes(rows: int, cols: int, bytes_per: float = 2) -> float:
    """An 8192 x 8192 matrix at 16-bit is 8192 * 8192 * 2 B = 128 MiB."""
    return rows * cols * bytes_per


def trains_like_llama(m: ModelSpec) -> bool:
    """RMSNorm, gated MLP, no dropout, rotary positions: the family ``shardwise train`` runs."""
    return m.gated_mlp and m.norm == "rms" and not m.dropout and not m.positions \
        and m.bias != "all"


def activation_bytes_per_layer(m: ModelSpec, s: int, b: int, tp: int, *, sp: bool,
                               recompute: str, precision: str = "bf16", ep: int = 1,
                               etp: int | None = None) -> float:
    """Stored activation bytes of one layer for one micro-batch on one TP rank (see above)."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    if trains_like_llama(m):
        return _llama_layer_bytes(m, s * b, tp, sp=sp, recompute=recompute,
                                  a_bytes=4 if precision == "fp32" else 2, ep=ep, etp=etp)
    h = m.hidden
    if recompute == "full":
        return 2 * s * b * h / (tp if sp else 1)
    replicated = s * b * h * (4 + 2 + 2 + (2 if m.dropout else 0))
    q = heads_per_rank(m, tp) * m.hd
    k = kv_heads_per_rank(m, tp) * m.hd
    f = -(-m.ffn // tp)
    split = s * b * (2 * q + 2 * k + 2 * k + 2 * q)  # Q, K, V into attention; attention output
    split += s * b * f * (6 if m.gated_mlp else 4)
    if recompute == "none":
        split += heads_per_rank(m, tp) * s * s * b * (5 if m.dropout else 2)
    return (replicated / tp if sp else replicated) + split


R = 4  # fp32: the residual stream and the normalised values


def _llama_layer_bytes(m: ModelSpec, tokens: int, tp: int, *, sp: bool, recompute: str,
                       a_bytes: float, ep: int = 1, etp: int | None = None) -> float:
    h, A = m.hidden, a_bytes
    sig = tp if sp else 1
    a = heads_per_rank(m, tp)
    q, k = a * m.hd, kv_heads_per_rank(m, tp) * m.hd
    f = -(-m.ffn // tp)
    if recompute == "full":
        return tokens * R * h / sig
    mlp = moe.activation_bytes(m, tokens, tp, ep, etp, recompute=recompute, a_bytes=A) \
        if m.is_moe else None
    if recompute == "selective":
        per = 2 * R * h / sig + A * (q + 2 * k) + A * q + 4 * a
        return tokens * (per + (2 * A * h if sp else 0)) + (
            mlp if mlp is not None else tokens * A * 2 * f)
    attn = A * 4 * q if a != kv_heads_per_rank(m, tp) else A * (3 * q + 3 * k)
    norms = 2 * R * h / sig + 2 * R * h / sig + 2 * R / sig + 2 * A * h
    return tokens * (norms + attn + 4 * a) + (mlp if mlp is not None else tokens * A * 4 * f)


def _stage_extra_bytes(m: ModelSpec, tokens: int, tp: int, *, sp: bool, recompute: str,
                       a_bytes: float, first: bool, last: bool) -> float:
    """Per micro-batch: rope tables; ids on the first stage; final norm and loss on the last."""
    h, out = m.hidden, 2 * R * m.hd * tokens
    if first:
        out += tokens * (8 + (4 if tp > 1 else 0))
    if last:
        sig = tp if sp else 1
        norm = R * h / sig if recompute == "selective" else (2 * R * h + R) / sig
        if recompute != "selective" or sp:
            norm += a_bytes * h  # the head's input (under SP all-gathered)
        out += tokens * (norm + 4 * vocab_rows_per_rank(m, tp) + 22)
    return out


def stage_params_per_rank(m: ModelSpec, tp: int, pp: int, ep: int = 1,
                          etp: int | None = None) -> tuple[int, int]:
    """(transformer-layer params, embedding/head params) on the busiest stage's busiest rank."""
    layers = layers_per_stage(m, pp) * layer_params_per_rank(m, tp, ep, etp)
    v = vocab_rows_per_rank(m, tp) * m.hidden
    emb = v + m.positions * m.hidden
    head = v if (pp > 1 or not m.tied_embeddings) else 0  # tied weights get a copy on the last stage
    edge = emb + head + m.norm_params() if pp == 1 else max(emb, head + m.norm_params())
    return layers, edge


def interleave_factor(pp: int, virtual_stages: int) -> float:
    """Extra in-flight activations of the interleaved schedule on the first stage: 1 + (p-1)/(p v)
    (Korthikanti et al. 2022, section 4.2.3, with v model chunks); 1 without interleaving."""
    if virtual_stages <= 1 or pp <= 1:
        return 1.0
    return 1 + (pp - 1) / (pp * virtual_stages)


def kv_bytes_per_token(m: ModelSpec, tp: int, pp: int = 1, kv_bytes: float = 2) -> float:
    """K and V of one token on one GPU. Llama-3-70B bf16: 320 KiB whole, 40 KiB per GPU at tp=8."""
    return 2 * layers_per_stage(m, pp) * kv_heads_per_rank(m, tp) * m.hd * kv_bytes


def training_memory(m: ModelSpec, *, tp: int, pp: int, dp: int, micro_batch: int, micro_batches: int,
                    seq: int, sp: bool, recompute: str, zero: int, capacity: float,
                    precision: str = "bf16", virtual_stages: int = 1, ep: int = 1,
                    etp: int | None = None) -> Memory:
    """Bytes on the busiest rank, each component at its busiest stage (see the module doc)."""
    if precision not in TRAIN_PRECISION:
        raise ValueError(f"training precision must be one of {', '.join(TRAIN_PRECISION)}, "
                         f"got {precision!r}")
    layers, edge = stage_params_per_rank(m, tp, pp, ep, etp)
    p = layers + edge
    copies = 0.0
    if precision != "fp32":  # autocast's 16-bit copies: every matmul weight of the stage
        head = vocab_rows_per_rank(m, tp) * m.hidden
        mm = layers_per_stage(m, pp) * matmul_params_per_rank(m, tp, ep, etp, held=True)
        copies = 2 * (mm + head)
    tokens = seq * micro_batch
    n_layers = layers_per_stage(m, pp)
    a_bytes = 4 if precision == "fp32" else 2
    kw = dict(sp=sp, precision=precision, ep=ep, etp=etp)
    act = activation_bytes_per_layer(m, seq, micro_batch, tp, recompute=recompute, **kw)
    llama = trains_like_llama(m)

    def stage(first: bool, last: bool, in_flight: int) -> float:
        extra = _stage_extra_bytes(m, tokens, tp, sp=sp, recompute=recompute, a_bytes=a_bytes,
                                   first=first, last=last) if llama else 0.0
        if last and not llama:
            extra += 4 * tokens * vocab_rows_per_rank(m, tp)  # fp32 logits
        return in_flight * (n_layers * act + extra) if not last else n_layers * act + extra
    if pp == 1:
        activations = stage(True, True, 1)
    else:
        in_flight = min(pp, micro_batches) * interleave_factor(pp, virtual_stages)
        activations = max(stage(True, False, in_flight), stage(False, True, 1))
    work = 0.0
    if recompute == "full":  # one layer rematerialised during its backward
        work = activation_bytes_per_layer(m, seq, micro_batch, tp, recompute="none", **kw)
    return Memory(weights=4 * p + copies, grads=4 * p / (dp if zero >= 2 else 1),
                  optimizer=8 * p / (dp if zero >= 1 else 1), activations=activations,
                  recompute_workspace=work, overhead=overhead_bytes(capacity))




def _mlp_columns(m: ModelSpec, tp: int, group: int) -> int:
    """Rank 0's MLP columns: split on multiples of the quantization group (``aligned_sizes``)."""
    while group > 1 and -(-m.ffn // group) < tp:
        group //= 2
    return split_sizes(-(-m.ffn // group), tp, empty_ok=True)[0] * group


def quantized_weight_bytes(m: ModelSpec, *, tp: int, pp: int, precision: str,
                           group: int | None = None, act_bytes: int = 2) -> float:
    """Weight bytes of the busiest rank (rank 0 of the first stage) as shardwise's loader holds
    an int8 or int4 model (see the module doc); ``group``: ``--quant``'s default for the
    precision (:data:`shardwise.quant.config.DEFAULT_GROUP`) unless given."""
    group = DEFAULT_GROUP[precision] if group is None else group
    h, hd = m.hidden, m.hd
    q, k = heads_per_rank(m, tp) * hd, kv_heads_per_rank(m, tp) * hd
    f = _mlp_columns(m, tp, group) if group else split_sizes(m.ffn, tp, empty_ok=True)[0]
    mat = lambda n, cols: kernel_bytes(n, cols, group or cols, 0, act_bytes=act_bytes,  # noqa: E731
                                       method=precision)
    layer = mat(q + 2 * k, h) + mat(h, q) + mat(2 * f, h) + mat(h, f) + 2 * h * act_bytes
    if m.bias == "qkv":
        layer += (q + 2 * k) * act_bytes
    rows = vocab_rows_per_rank(m, tp)
    edge = kernel_bytes(rows, h, group or h, act_bytes=act_bytes, method="int8")
    head = edge if (not m.tied_embeddings or pp > 1) else 0
    stage_edge = edge + head + h * act_bytes if pp == 1 else max(edge, head + h * act_bytes)
    return layers_per_stage(m, pp) * layer + stage_edge


def serving_memory(m: ModelSpec, *, tp: int, pp: int, batch: int, prompt: int, output: int,
                   precision: str, kv_bytes: float, capacity: float, ep: int = 1,
                   etp: int | None = None) -> Memory:
    """Weights (16-bit and fp8: embeddings and head kept 16-bit; int8/int4: as shardwise's loader
    holds them), KV cache for ``batch`` full-length sequences (``batch / ep`` on a rank under
    expert parallelism), prefill workspace for one prompt (its layer activations and the batch's
    fp32 logits)."""
    layers, edge = stage_params_per_rank(m, tp, pp, ep, etp)
    if precision in ("int8", "int4") and trains_like_llama(m) and not m.experts:
        weights = quantized_weight_bytes(m, tp=tp, pp=pp, precision=precision)
    else:
        weights = layers * WEIGHT_BYTES[precision] + edge * 2
    mine = -(-batch // ep)
    kv = mine * (prompt + output) * kv_bytes_per_token(m, tp, pp, kv_bytes)
    q = heads_per_rank(m, tp) * m.hd
    k = kv_heads_per_rank(m, tp) * m.hd
    f = -(-m.ffn // tp)
    mlp = 3 * f if not m.is_moe else \
        m.experts * 4 / 2 + moe.routed_rows(m, 1, tp, etp) * (m.hidden + 3 * moe.expert_width(m, tp, etp))
    work = prompt * (m.hidden + q + 2 * k + mlp) * 2 + mine * vocab_rows_per_rank(m, tp) * 4
    return Memory(weights=weights, activations=work, kv_cache=kv, overhead=overhead_bytes(capacity))
