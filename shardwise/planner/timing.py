"""Seconds: compute from FLOPs, memory traffic from bytes, collectives from the alpha-beta model.

Collectives (ring; nccl-tests' bus bandwidth B, latency alpha; S bytes, n ranks):

    all-reduce                    alpha + 2 (n-1)/n x S / B
    all-gather, reduce-scatter    alpha + (n-1)/n x S / B        (S = the full gathered buffer)

Training (Narayanan et al. 2021): per layer and micro-batch, tensor parallelism does 4 all-reduces
of b s h activations (2 forward, 2 backward): 8 b s h (t-1)/t elements per device; full
recomputation repeats the forward pair (6). With sequence parallelism each all-reduce becomes an
all-gather plus a reduce-scatter of the same total volume (twice the latency). FLOPs per iteration
with full recomputation F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h)), 72 instead of 96 without it:
computed here from the shapes as 2 x (matmul weights) per token plus 4 b s^2 h per layer for the
attention scores, times 3 for forward + backward (+1 forward for full recomputation).
1F1B pipeline: (m + p - 1) micro-batch slots of which (p - 1) are bubble, (p-1)/(m+p-1) of the time.
The data-parallel gradient all-reduce overlaps the last micro-batch's backward when enabled.

Serving: prefill of one prompt is compute-bound (2 N P + causal attention 2 P^2 q l FLOPs), decode
is bound by reading the weights and KV cache (bytes / HBM bandwidth) or by FLOPs, whichever is
slower, plus 2 all-reduces of b x h activations per layer. With p stages the batch is split into p
micro-batches; each token passes all p stages, so TPOT = p x stage time.
"""
from __future__ import annotations

from dataclasses import dataclass

from .gpus import GPUSpec, Link
from .models import (ModelSpec, heads_per_rank, layers_per_stage, matmul_params_per_rank,
                     vocab_rows_per_rank)

MATMUL_EFFICIENCY = 0.6  # achieved / peak tensor FLOP/s; Narayanan et al. reach 44-52% end to end
HBM_EFFICIENCY = 0.8  # achieved / datasheet memory bandwidth when streaming weights and KV cache
OPTIMIZER_BYTES = 28  # Adam step per parameter: read fp32 w, m, v, 16-bit g; write w, m, v, 16-bit w


def allreduce_s(nbytes: float, n: int, link: Link) -> float:
    return 0.0 if n <= 1 else link.alpha_s + 2 * (n - 1) / n * nbytes / (link.busbw_GBps * 1e9)


def gather_s(nbytes: float, n: int, link: Link) -> float:
    """All-gather or reduce-scatter of a full buffer of ``nbytes``."""
    return 0.0 if n <= 1 else link.alpha_s + (n - 1) / n * nbytes / (link.busbw_GBps * 1e9)


def p2p_s(nbytes: float, link: Link) -> float:
    return link.alpha_s + nbytes / (link.busbw_GBps * 1e9)


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
    compute_s: float  # one micro-batch, forward + backward, busiest stage
    tp_comm_s: float  # one micro-batch
    p2p_s: float  # one micro-batch
    micro_batches: int
    pp: int
    dp_comm_s: float
    dp_exposed_s: float
    optimizer_s: float

    @property
    def micro_batch_s(self) -> float:
        return self.compute_s + self.tp_comm_s + self.p2p_s

    @property
    def bubble_s(self) -> float:
        return (self.pp - 1) * self.micro_batch_s

    @property
    def step_s(self) -> float:
        slots = self.micro_batches + self.pp - 1
        return slots * self.micro_batch_s + self.dp_exposed_s + self.optimizer_s

    @property
    def tp_share(self) -> float:
        """Fraction of the step spent in tensor-parallel collectives."""
        return (self.micro_batches + self.pp - 1) * self.tp_comm_s / self.step_s


def train_time(m: ModelSpec, gpu: GPUSpec, *, tp: int, pp: int, dp: int, micro_batch: int,
               micro_batches: int, seq: int, precision: str, sp: bool, recompute: str,
               zero1: bool, dp_overlap: bool, stage_params: int, tp_link: Link, pp_link: Link,
               dp_link: Link) -> TrainTime:
    b, s, h = micro_batch, seq, m.hidden
    q = heads_per_rank(m, tp) * m.hd
    layers = layers_per_stage(m, pp)
    fwd = 2 * b * s * matmul_params_per_rank(m, tp) + 4 * b * s * s * q
    mult = 4 if recompute == "full" else 3
    extra = 4 * b * s * s * q if recompute == "selective" else 0
    logits = 3 * 2 * b * s * h * vocab_rows_per_rank(m, tp)
    flops = layers * (mult * fwd + extra) + logits
    compute = flops / (gpu.peak_flops(precision) * MATMUL_EFFICIENCY)
    act = b * s * h * 2
    n_ar = 6 if recompute == "full" else 4
    one = 2 * gather_s(act, tp, tp_link) if sp else allreduce_s(act, tp, tp_link)
    tp_comm = layers * n_ar * one
    p2p = 2 * p2p_s(act / tp, pp_link) if pp > 1 else 0.0
    grads = stage_params * 2
    dp_comm = (2 * gather_s(grads, dp, dp_link)) if zero1 else allreduce_s(grads, dp, dp_link)
    backward = compute * 2 / mult
    exposed = max(0.0, dp_comm - backward) if dp_overlap else dp_comm
    opt = stage_params * OPTIMIZER_BYTES / (dp if zero1 else 1) / (gpu.hbm_GBps * 1e9 * HBM_EFFICIENCY)
    return TrainTime(compute, tp_comm, p2p, micro_batches, pp, dp_comm, exposed, opt)


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


def serve_time(m: ModelSpec, gpu: GPUSpec, *, tp: int, pp: int, dp: int, batch: int, prompt: int,
               output: int, precision: str, weight_bytes: float, kv_token_bytes: float,
               tp_link: Link, pp_link: Link) -> ServeTime:
    """``weight_bytes`` and ``kv_token_bytes`` are per GPU on the busiest stage."""
    h = m.hidden
    layers = layers_per_stage(m, pp)
    q = heads_per_rank(m, tp) * m.hd
    w = matmul_params_per_rank(m, tp)
    head = 2 * h * vocab_rows_per_rank(m, tp)
    peak = gpu.peak_flops(precision) * MATMUL_EFFICIENCY
    hbm = gpu.hbm_GBps * 1e9 * HBM_EFFICIENCY
    # prefill of one prompt: stages run one after another
    pf = layers * (2 * prompt * w + 2 * prompt * prompt * q) + head
    pf_comm = layers * 2 * allreduce_s(prompt * h * 2, tp, tp_link)
    pf_hop = p2p_s(prompt * h * 2, pp_link) if pp > 1 else 0.0
    stage = max(pf / peak, weight_bytes / hbm) + pf_comm + pf_hop
    # decode: p micro-batches of ceil(b / p) sequences, each token crosses p stages
    bm = -(-batch // pp)
    ctx = prompt + output / 2
    dflops = layers * (2 * bm * w + 4 * bm * ctx * q) + bm * head
    dbytes = weight_bytes + bm * ctx * kv_token_bytes
    comm = layers * 2 * allreduce_s(bm * h * 2, tp, tp_link)
    c, mem = dflops / peak, dbytes / hbm
    hop = p2p_s(bm * h * 2, pp_link) if pp > 1 else 0.0
    tpot = pp * (max(c, mem) + comm + hop)
    return ServeTime(pp * stage, stage, pf_comm, tpot, pp * c, pp * mem, pp * comm, batch, output, dp)
