"""Seconds of a training step, of time to first token and of time per output token.

Training, per micro-batch on each pipeline stage, is the sum of its layers (``layer.py``: GEMMs from
their shapes, memory-bound kernels from their bytes, the collectives the software does not hide),
plus the embedding on the first stage and the output head and loss on the last. The schedule is
1F1B (Narayanan et al. 2021, section 2.2) with m micro-batches over p stages of times T_i:

    non-interleaved    (m - 1) max T_i + sum T_i            = (m + p - 1) T for equal stages
    interleaved, v     m max T_i + (sum T_i - max T_i) / v  = (m + (p - 1) / v) T
                       model chunks per GPU (virtual stages): the bubble divided by v, and v times
                       the pipeline sends (2 v per micro-batch, each b s h x 2 bytes, / t with the
                       scatter/gather optimization plus an NVLink all-gather; blocking unless the
                       software overlaps them)

After the last backward: the data-parallel gradient all-reduce (reduce-scatter + all-gather with
ZeRO-1) of the stage's 16-bit gradients, exposed unless the software overlaps it with the last
micro-batch's backward (then only the excess); with pp > 1 and tied embeddings, the all-reduce of the
embedding gradient between the first and last stage; then the optimizer step, memory-bound at
OPTIMIZER_BYTES per parameter. FLOPs per iteration with full recomputation equal Narayanan's
F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h)) for GPT shapes, 72 instead of 96 without recomputation.

Serving: prefill of one prompt runs its GEMMs (``kernels.gemm_s``) and fused attention; decode reads
the weights and KV cache at the streaming bandwidth or is bound by the GEMM ceiling, whichever is
slower, plus 2 all-reduces of b x h activations per layer. With p stages the batch is split into p
micro-batches; each token passes all p stages, so TPOT = p x stage time.

Mixtures of experts (``moe.py``): FLOPs count the k experts a token runs (active parameters); a
decode step reads the dense weights and the experts its tokens chose; with ep > 1 the EP group's
all-to-alls (two per layer each way) are added and the b sequences of a replica split over the ep
TP groups; the data-parallel gradient reduction spans dp x ep ranks for the dense weights and dp
for the experts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .collectives import allreduce_s, gather_s, p2p_s
from .gpus import GPUSpec, Link
from .kernels import flash_attention_s, gemm_s, stream_s
from .layer import Setup, Work, embedding_time, head_time, layer_time
from . import moe
from .models import (ModelSpec, experts_per_rank, heads_per_rank, kv_heads_per_rank,
                     layers_per_stage, matmul_params_per_rank, vocab_rows_per_rank)
from .memory import WEIGHT_BYTES
from .software import DEFAULT_SOFTWARE, SOFTWARE, Software

__all__ = ["allreduce_s", "gather_s", "p2p_s", "train_time", "serve_time", "training_flops"]

# Mixed-precision Adam per parameter (Megatron's fp16/bf16 optimizer): 16-bit gradient to fp32 main
# gradient (read 2, write 4), unscale and inf check (read 4, write 4), gradient-norm clipping (read 4),
# fused Adam (read w, g, m, v; write w, m, v: 28), fp32 weights back to 16-bit (read 4, write 2).
OPTIMIZER_BYTES = 6 + 8 + 4 + 28 + 6


def tp_volume_per_layer(b: int, s: int, h: int, t: int) -> float:
    """Elements each device moves per layer per micro-batch in training: 8 b s h (t-1)/t."""
    return 4 * 2 * (t - 1) / t * b * s * h


def training_flops(m: ModelSpec, batch: int, seq: int, recompute: str) -> float:
    """FLOPs of one iteration over ``batch`` sequences (hardware FLOPs: recomputation counted)."""
    fwd = 2 * batch * seq * m.matmul_params_per_layer() + 4 * batch * seq * seq * m.q_dim
    per_layer = 3 * fwd
    if recompute == "full":
        per_layer += fwd
    elif recompute == "selective":
        per_layer += 4 * batch * seq * seq * m.q_dim
    return m.layers * per_layer + 3 * 2 * batch * seq * m.hidden * m.vocab


@dataclass(frozen=True)
class TrainTime:
    compute_s: float  # one micro-batch, forward + backward, busiest stage: GEMMs + memory-bound
    tp_comm_s: float  # one micro-batch, exposed TP collectives
    p2p_s: float  # one micro-batch, exposed pipeline sends
    micro_batches: int
    pp: int
    bubble_s: float  # pipeline fill and drain
    dp_comm_s: float
    dp_exposed_s: float
    optimizer_s: float
    virtual_stages: int = 1
    embedding_sync_s: float = 0.0  # tied embedding gradient between first and last stage
    gemm_s: float = 0.0  # the tensor-core part of compute_s
    ep_comm_s: float = 0.0  # one micro-batch, expert-parallel all-to-alls

    @property
    def micro_batch_s(self) -> float:
        return self.compute_s + self.tp_comm_s + self.p2p_s + self.ep_comm_s

    @property
    def step_s(self) -> float:
        return (self.micro_batches * self.micro_batch_s + self.bubble_s + self.dp_exposed_s
                + self.optimizer_s + self.embedding_sync_s)

    @property
    def tp_share(self) -> float:
        """Fraction of the step spent in exposed tensor-parallel collectives."""
        return self.micro_batches * self.tp_comm_s / self.step_s


def pipeline_s(stages: list[float], micro_batches: int, virtual_stages: int) -> float:
    """Time of m micro-batches through stages of the given per-micro-batch times (docstring)."""
    top, total = max(stages), sum(stages)
    if virtual_stages <= 1:
        return (micro_batches - 1) * top + total
    return micro_batches * top + (total - top) / virtual_stages


def _p2p(m: ModelSpec, s: Setup, pp: int, v: int, pp_link: Link) -> float:
    """Exposed pipeline-send seconds per micro-batch on one stage."""
    if pp == 1 or s.software.p2p_overlap:
        return 0.0
    act = s.micro_batch * s.seq * m.hidden * 2
    if s.software.scatter_gather and s.tp > 1:
        one = p2p_s(act / s.tp, pp_link) + gather_s(act, s.tp, s.tp_link)
    else:
        one = p2p_s(act, pp_link)
    return 2 * v * one


def train_time(m: ModelSpec, gpu: GPUSpec, *, tp: int, pp: int, dp: int, micro_batch: int,
               micro_batches: int, seq: int, precision: str, sp: bool, recompute: str,
               zero1: bool, dp_overlap: bool, stage_params: int, tp_link: Link, pp_link: Link,
               dp_link: Link, virtual_stages: int = 1, software: Software | None = None,
               ep: int = 1, etp: int | None = None, ep_link: Link | None = None) -> TrainTime:
    sw = software or SOFTWARE[DEFAULT_SOFTWARE]
    s = Setup(tp, micro_batch, seq, sp, recompute, sw, precision, tp_link, ep, etp, ep_link)
    layer = layer_time(m, gpu, s)
    n = layers_per_stage(m, pp)
    head, emb = head_time(m, gpu, s), embedding_time(m, gpu, s)
    body = layer.total * n
    p2p = _p2p(m, s, pp, virtual_stages, pp_link)
    if pp == 1:
        stages = [body + emb.total + head.total]
    else:
        stages = [body + emb.total, body + head.total] + [body] * (pp - 2)
    times = [w.total_s + p2p for w in stages]
    busiest = stages[times.index(max(times))]
    pipe = pipeline_s(times, micro_batches, virtual_stages)
    bubble = pipe - micro_batches * max(times)
    expert = layers_per_stage(m, pp) * experts_per_rank(m, tp, ep, etp) * \
        m.expert_params(moe.expert_width(m, tp, etp)) if m.is_moe else 0
    grads, dense_over = (stage_params - expert) * 2, dp * ep
    dp_comm = 2 * gather_s(grads, dense_over, dp_link) if zero1 \
        else allreduce_s(grads, dense_over, dp_link)
    if expert:
        dp_comm += 2 * gather_s(expert * 2, dp, dp_link) if zero1 \
            else allreduce_s(expert * 2, dp, dp_link)
    window = (layer.backward * n + head.backward).total_s  # the last micro-batch's backward
    exposed = max(0.0, dp_comm - window) if (dp_overlap and sw.dp_overlap) else dp_comm
    emb_sync = 0.0
    if pp > 1 and m.tied_embeddings:
        emb_sync = allreduce_s(vocab_rows_per_rank(m, tp) * m.hidden * 2, 2, pp_link)
    opt = stream_s(gpu, stage_params * OPTIMIZER_BYTES / (dp if zero1 else 1))
    return TrainTime(busiest.compute_s, busiest.comm_s, p2p, micro_batches, pp, bubble, dp_comm,
                     exposed, opt, virtual_stages, emb_sync, busiest.gemm_s, busiest.a2a_s)


@dataclass(frozen=True)
class ServeTime:
    ttft_s: float  # prefill of one prompt through all stages
    prefill_busy_s: float  # how long one prefill occupies a stage (pipelined prefills overlap)
    prefill_comm_s: float  # TP all-reduce inside prefill_busy_s
    tpot_s: float
    decode_compute_s: float  # per token, summed over stages
    decode_memory_s: float
    decode_comm_s: float
    batch: int  # sequences per replica
    output: int
    dp: int
    decode_a2a_s: float = 0.0  # per token, summed over stages: expert-parallel all-to-alls
    prefill_a2a_s: float = 0.0  # inside prefill_busy_s

    @property
    def throughput(self) -> float:
        """Output tokens/s of all replicas: each replica generates batch x output tokens in
        output x TPOT of decode plus batch prefills."""
        cycle = self.output * self.tpot_s + self.batch * self.prefill_busy_s
        return self.dp * self.batch * self.output / cycle

    @property
    def decode_comm_share(self) -> float:
        """Fraction of a decode step spent in TP all-reduces."""
        return self.decode_comm_s / self.tpot_s if self.tpot_s else 0.0

    @property
    def decode_a2a_share(self) -> float:
        """Fraction of a decode step spent in expert-parallel all-to-alls."""
        return self.decode_a2a_s / self.tpot_s if self.tpot_s else 0.0


def _prefill_s(m: ModelSpec, gpu: GPUSpec, tp: int, tokens: int, precision: str, ep: int = 1,
               etp: int | None = None) -> float:
    """One layer's GEMMs and causal fused attention over a prompt of ``tokens`` on one TP rank
    (a mixture of experts: the prompt's expert rows spread over the ep groups' slots)."""
    h, f = m.hidden, math.ceil(m.ffn / tp)
    q = heads_per_rank(m, tp) * m.hd
    k = kv_heads_per_rank(m, tp) * m.hd
    p = "bf16" if precision in ("int8", "int4") else precision  # weight-only: 16-bit compute
    gemms = gemm_s(gpu, tokens, q + 2 * k, h, 1, p) + gemm_s(gpu, tokens, h, q, 1, p)
    if m.is_moe:
        gemms += sum(x[0] for x in moe.linears(m, gpu, math.ceil(tokens / ep), tp, ep, etp, p))
    else:
        gemms += gemm_s(gpu, tokens, f * (2 if m.gated_mlp else 1), h, 1, p) + gemm_s(gpu, tokens, h, f, 1, p)
    return gemms + flash_attention_s(gpu, 2.0 * tokens * tokens * q, backward=False, precision=p)


def serve_time(m: ModelSpec, gpu: GPUSpec, *, tp: int, pp: int, dp: int, batch: int, prompt: int,
               output: int, precision: str, weight_bytes: float, kv_token_bytes: float,
               tp_link: Link, pp_link: Link, ep: int = 1, etp: int | None = None,
               ep_link: Link | None = None) -> ServeTime:
    """``weight_bytes`` and ``kv_token_bytes`` are per GPU on the busiest stage. With ep > 1 the
    ``batch`` sequences of a replica split over its ep TP groups."""
    h = m.hidden
    layers = layers_per_stage(m, pp)
    q = heads_per_rank(m, tp) * m.hd
    w = matmul_params_per_rank(m, tp, ep, etp)
    head = 2 * h * vocab_rows_per_rank(m, tp)
    p = "bf16" if precision in ("int8", "int4") else precision
    ceiling = gpu.peak_flops(p) * gpu.matmul_fraction
    a2a = (lambda tokens: layers * sum(moe.alltoall_time(m, tokens, tp, ep, etp, ep_link)[:1])) \
        if m.is_moe and ep > 1 else (lambda tokens: 0.0)
    # prefill of one prompt: stages run one after another
    pf = layers * _prefill_s(m, gpu, tp, prompt, precision, ep, etp) + head / ceiling
    pf_comm = layers * 2 * allreduce_s(prompt * h * 2, tp, tp_link)
    pf_a2a = a2a(math.ceil(prompt / ep))
    pf_hop = p2p_s(prompt * h * 2, pp_link) if pp > 1 else 0.0
    stage = max(pf, stream_s(gpu, weight_bytes)) + pf_comm + pf_a2a + pf_hop
    # decode: p micro-batches of ceil(b / p) sequences, each token crosses p stages; under EP
    # each TP group runs ceil(b / (p ep)) of them
    bm = -(-batch // (pp * ep))
    ctx = prompt + output / 2
    dflops = layers * (2 * bm * w + 4 * bm * ctx * q) + bm * head
    read = weight_bytes
    if m.is_moe:  # the experts no token of the step chose stay unread
        held = layers * experts_per_rank(m, tp, ep, etp) * m.expert_params(moe.expert_width(m, tp, etp))
        wb = WEIGHT_BYTES[precision]
        read -= held * wb - layers * moe.decode_expert_params(m, tp, ep, etp, bm) * wb
    dbytes = read + bm * ctx * kv_token_bytes
    comm = layers * 2 * allreduce_s(bm * h * 2, tp, tp_link)
    d_a2a = a2a(bm)
    c, mem = dflops / ceiling, stream_s(gpu, dbytes)
    hop = p2p_s(bm * h * 2, pp_link) if pp > 1 else 0.0
    tpot = pp * (max(c, mem) + comm + d_a2a + hop)
    return ServeTime(pp * stage, stage, pf_comm, tpot, pp * c, pp * mem, pp * comm, batch, output, dp,
                     pp * d_a2a, pf_a2a)
