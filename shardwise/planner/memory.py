"""Bytes per GPU: weights, gradients, Adam states, activations, KV cache and a stated overhead.

Training (mixed precision Adam, Rajbhandari et al. 2020 'ZeRO'): 16-bit weights 2 B/param, 16-bit
gradients 2 B, fp32 master weights + Adam m and v 12 B; ZeRO-1 (distributed optimizer) divides the
12 B over the dp ranks.

Activations per layer (Korthikanti et al. 2022, Table 2; 16-bit values, 1-byte dropout masks; s
sequence, b micro-batch, h hidden, a heads, t tensor-parallel degree):

    no parallelism                        s b h (34 + 5 a s / h)
    tensor parallel                       s b h (10 + 24 / t + 5 a s / (h t))
    tensor + sequence parallel            s b h / t (34 + 5 a s / h)
    selective recomputation (+ SP)        s b h (10 + 24 / t)      (34 s b h / t)
    full recomputation                    2 s b h                  (2 s b h / t)

The 10 s b h that TP alone cannot split is the LayerNorm inputs (4), the inputs of the QKV and
first MLP matmuls (2 + 2) and two dropout masks (2). The rest is generalised here to GQA (K and V
narrower than Q), gated MLPs (gate, up and their product: 6 s b f instead of 4 s b f) and models
without dropout (no masks; softmax output kept once: 2 a s^2 b instead of 5 a s^2 b). For GPT
shapes the general formula equals the table exactly.

With 1F1B pipelining the first stage holds min(p, m) micro-batches of activations (times
1 + (p-1)/(p v) with v interleaved model chunks); the last stage also holds fp32 logits, 4 s b V / t.

KV cache per token per GPU: 2 x (layers / pp) x (KV heads per rank) x head_dim x bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from .models import (ModelSpec, heads_per_rank, kv_heads_per_rank, layer_params_per_rank,
                     layers_per_stage, vocab_rows_per_rank)

GiB = 2**30
RUNTIME_BYTES = 1 * GiB  # CUDA context, cuBLAS workspace, NCCL buffers
FRAGMENTATION = 0.05  # of GPU capacity, kept free for the caching allocator
# Bytes per weight. int4: group-wise (128) fp16 scale and zero point add 4 / 128 B (AWQ/GPTQ style).
WEIGHT_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5 + 4 / 128}
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU on the busiest rank."""

    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
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


def activation_bytes_per_layer(m: ModelSpec, s: int, b: int, tp: int, *, sp: bool,
                               recompute: str) -> float:
    """Stored activation bytes of one layer for one micro-batch on one TP rank (table above)."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
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


def stage_params_per_rank(m: ModelSpec, tp: int, pp: int) -> tuple[int, int]:
    """(transformer-layer params, embedding/head params) on the busiest stage's busiest rank."""
    layers = layers_per_stage(m, pp) * layer_params_per_rank(m, tp)
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
                    seq: int, sp: bool, recompute: str, zero1: bool, capacity: float,
                    virtual_stages: int = 1) -> Memory:
    layers, edge = stage_params_per_rank(m, tp, pp)
    p = layers + edge
    act = activation_bytes_per_layer(m, seq, micro_batch, tp, sp=sp, recompute=recompute)
    n_layers = layers_per_stage(m, pp)
    work = 0.0
    if recompute == "full":  # one layer rematerialised during its backward
        work = activation_bytes_per_layer(m, seq, micro_batch, tp, sp=sp, recompute="none")
    logits = 4 * seq * micro_batch * vocab_rows_per_rank(m, tp)
    in_flight = min(pp, micro_batches) * interleave_factor(pp, virtual_stages)
    first = n_layers * act * in_flight + work
    last = n_layers * act + work + logits
    return Memory(weights=2 * p, grads=2 * p, optimizer=12 * p / (dp if zero1 else 1),
                  activations=max(first, last) if pp > 1 else last, overhead=overhead_bytes(capacity))


def serving_memory(m: ModelSpec, *, tp: int, pp: int, batch: int, prompt: int, output: int,
                   precision: str, kv_bytes: float, capacity: float) -> Memory:
    """Weights (embeddings and head kept 16-bit), KV cache for ``batch`` full-length sequences,
    prefill workspace for one prompt (its layer activations and the batch's fp32 logits)."""
    layers, edge = stage_params_per_rank(m, tp, pp)
    weights = layers * WEIGHT_BYTES[precision] + edge * 2
    kv = batch * (prompt + output) * kv_bytes_per_token(m, tp, pp, kv_bytes)
    q = heads_per_rank(m, tp) * m.hd
    k = kv_heads_per_rank(m, tp) * m.hd
    f = -(-m.ffn // tp)
    work = prompt * (m.hidden + q + 2 * k + 3 * f) * 2 + batch * vocab_rows_per_rank(m, tp) * 4
    return Memory(weights=weights, activations=work, kv_cache=kv, overhead=overhead_bytes(capacity))
