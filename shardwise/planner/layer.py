"""Seconds of one transformer layer (and of the embedding and output head) for one micro-batch on
one tensor-parallel rank, built from its kernels (``kernels.py``) and its collectives.

Shapes (b micro-batch, s sequence, T = b s tokens, h hidden, per rank: nh heads, q = nh hd query
width, k KV width, f FFN columns; Tn = T / t tokens under sequence parallelism, else T):

    forward GEMMs   QKV (T, q + 2k, h)   out (T, h, q)   up (T, f or 2f, h)   down (T, h, f)
    backward        each GEMM (m, n, k) gives an input-gradient GEMM (m, k, n) and a weight-gradient
                    GEMM (k, n, m)
    attention       scores materialised (Megatron 2021/2022): batched GEMMs QK^T (s, s, hd) and AV
                    (s, hd, s) over b nh heads, plus softmax and dropout over E = b nh s^2 scores;
                    fused (FlashAttention): 4 b s^2 q FLOPs forward, halved by the causal mask

Memory-bound bytes per element (16-bit values, 1-byte dropout masks; Megatron's fused kernels,
Narayanan 2021 section 4.2, so each line is one kernel that reads its inputs once):

    kernel                       forward                  backward
    LayerNorm / RMSNorm (x2)     4 (read x, write y)      6 (read dy, x; write dx)
    bias+dropout+add (x2)        7 (read x, residual;     11 (dropout backward 5, residual
                                 write y; write mask)         gradient sum 6); 6 / 6 without dropout
    bias+GeLU on T f             4                        6 (read dy, x; write dx)
    SwiGLU on T f                6 (read gate, up)        10
    scale+mask+softmax on E      4                        6
    attention dropout on E       5 (write mask)           5
    rotary embedding on T (q+k)  4                        4

Tensor parallelism (t > 1), activations A = T h x 2 bytes: two all-reduces of A forward and two
backward (at the inputs of the column-parallel QKV and up projections); with sequence parallelism
each becomes an all-gather plus a reduce-scatter, and the backward re-gathers the two saved inputs
for the weight gradients. With ``tp_overlap_backward`` the backward input-gradient collective of
each column-parallel layer hides behind its weight-gradient GEMM (and the re-gather behind the
input-gradient GEMM); the excess is exposed, and while they overlap the collective holds
OVERLAP_CONTENTION of the GPU (min(comm, gemm) x 0.15 is added). Full recomputation repeats the
layer's forward
(collectives included) before its backward; selective recomputation repeats the attention core.
The head and embedding are never recomputed.

A mixture-of-experts layer (``moe.py``) replaces the up and down GEMMs by the router's and its
local experts' GEMMs and SwiGLU by the experts' (on their routed rows), and adds, with ep > 1, the
all-to-alls of the EP group (kept apart as ``Work.a2a_s``; never hidden).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from .gpus import GPUSpec, Link
from .kernels import flash_attention_s, gemm_s, stream_s
from .models import ModelSpec, heads_per_rank, kv_heads_per_rank, vocab_rows_per_rank
from .software import Software
from .collectives import allreduce_s, gather_s
from . import moe

# While a collective runs under a GEMM, NCCL's kernels hold SMs: Calculon's A100 system description
# (calculon-ai/calculon systems/a100_80g.json, NVLink "processor_usage") charges 15% of the compute.
OVERLAP_CONTENTION = 0.15
CE_FORWARD_BYTES = 26  # per logit: read 16-bit, write fp32, max, exp, sum and normalise passes (fp32)
CE_BACKWARD_BYTES = 10  # per logit: read the saved softmax (fp32), write the 16-bit gradient


@dataclass(frozen=True)
class Work:
    """Seconds of a piece of the step on one GPU, by what bounds it."""

    gemm_s: float = 0.0  # tensor-core kernels (GEMMs, fused attention)
    memory_s: float = 0.0  # memory-bound kernels
    comm_s: float = 0.0  # TP collectives not hidden behind compute
    a2a_s: float = 0.0  # expert-parallel all-to-alls

    def __add__(self, o: "Work") -> "Work":
        return Work(self.gemm_s + o.gemm_s, self.memory_s + o.memory_s, self.comm_s + o.comm_s,
                    self.a2a_s + o.a2a_s)

    def __mul__(self, k: float) -> "Work":
        return Work(self.gemm_s * k, self.memory_s * k, self.comm_s * k, self.a2a_s * k)

    @property
    def compute_s(self) -> float:
        return self.gemm_s + self.memory_s

    @property
    def total_s(self) -> float:
        return self.gemm_s + self.memory_s + self.comm_s + self.a2a_s


@dataclass(frozen=True)
class PassTime:
    forward: Work
    backward: Work  # recomputation included

    @property
    def total(self) -> Work:
        return self.forward + self.backward


@dataclass(frozen=True)
class Setup:
    """Everything one layer's time depends on besides the model and the GPU."""

    tp: int
    micro_batch: int
    seq: int
    sp: bool
    recompute: str
    software: Software
    precision: str
    tp_link: Link
    ep: int = 1  # TP groups beside each other splitting the experts (models.expert_slots)
    etp: int | None = None  # ranks each expert is split over (None: tp)
    ep_link: Link | None = None  # what the EP group's all-to-alls see


def _linear(gpu, setup: Setup, m: int, n: int, k: int) -> tuple[float, float, float]:
    """(forward, input-gradient, weight-gradient) seconds of one linear layer."""
    p = setup.precision
    return gemm_s(gpu, m, n, k, 1, p), gemm_s(gpu, m, k, n, 1, p), gemm_s(gpu, k, n, m, 1, p)


def _collective(setup: Setup, nbytes: float) -> tuple[float, float]:
    """(all-reduce, all-gather or reduce-scatter) seconds of an activation of ``nbytes``."""
    t, link = setup.tp, setup.tp_link
    return allreduce_s(nbytes, t, link), gather_s(nbytes, t, link)


def _attention_core(m: ModelSpec, gpu: GPUSpec, s: Setup) -> PassTime:
    """QK^T, softmax, dropout and AV for one micro-batch (forward and backward)."""
    b, seq, hd = s.micro_batch, s.seq, m.hd
    nh = heads_per_rank(m, s.tp)
    if s.software.fused_attention:
        flops = 4.0 * b * seq * seq * nh * hd / 2  # causal: half the blocks
        return PassTime(Work(flash_attention_s(gpu, flops, backward=False, precision=s.precision)),
                        Work(flash_attention_s(gpu, 2.5 * flops, backward=True, precision=s.precision)))
    batch, p = b * nh, s.precision
    scores = gemm_s(gpu, seq, seq, hd, batch, p)
    context = gemm_s(gpu, seq, hd, seq, batch, p)
    e = batch * seq * seq
    drop = 5 * e if m.dropout else 0
    fwd = Work(scores + context, stream_s(gpu, 4 * e) + (stream_s(gpu, drop) if drop else 0.0))
    bwd = Work(scores + 3 * context, stream_s(gpu, 6 * e) + (stream_s(gpu, drop) if drop else 0.0))
    return PassTime(fwd, bwd)


def _elementwise(m: ModelSpec, gpu: GPUSpec, s: Setup) -> PassTime:
    """Norms, residual adds (with bias and dropout), the MLP activation and rotary embedding."""
    t = s.tp
    tokens = s.micro_batch * s.seq
    tn = math.ceil(tokens / t) if s.sp else tokens
    h, f = m.hidden, math.ceil(m.ffn / t)
    q = heads_per_rank(m, t) * m.hd
    k = kv_heads_per_rank(m, t) * m.hd
    mask = 1 if m.dropout else 0
    fwd = 2 * stream_s(gpu, 4 * tn * h) + 2 * stream_s(gpu, (6 + mask) * tn * h)
    bwd = 2 * stream_s(gpu, 6 * tn * h) + 2 * stream_s(gpu, (11 if m.dropout else 6) * tn * h)
    if m.is_moe:
        mf, mb = moe.elementwise(m, gpu, tokens, t, s.etp)
        fwd, bwd = fwd + mf, bwd + mb
    else:
        fwd += stream_s(gpu, (6 if m.gated_mlp else 4) * tokens * f)
        bwd += stream_s(gpu, (10 if m.gated_mlp else 6) * tokens * f)
    if not m.positions:  # rotary embedding on q and k
        fwd += stream_s(gpu, 4 * tokens * (q + k))
        bwd += stream_s(gpu, 4 * tokens * (q + k))
    return PassTime(Work(memory_s=fwd), Work(memory_s=bwd))


@lru_cache(maxsize=4096)
def layer_time(m: ModelSpec, gpu: GPUSpec, s: Setup) -> PassTime:
    """One transformer layer, one micro-batch, one TP rank (module docstring)."""
    t, h = s.tp, m.hidden
    tokens = s.micro_batch * s.seq
    q = heads_per_rank(m, t) * m.hd
    k = kv_heads_per_rank(m, t) * m.hd
    f = math.ceil(m.ffn / t)
    qkv = _linear(gpu, s, tokens, q + 2 * k, h)
    out = _linear(gpu, s, tokens, h, q)
    if m.is_moe:
        router, up, down = moe.linears(m, gpu, tokens, t, s.ep, s.etp, s.precision)
        mlp = (router, up, down)
    else:
        up = _linear(gpu, s, tokens, f * (2 if m.gated_mlp else 1), h)
        down = _linear(gpu, s, tokens, h, f)
        mlp = (up, down)
    lin = (qkv, out) + mlp
    fwd = Work(sum(x[0] for x in lin))
    bwd = Work(sum(x[1] + x[2] for x in lin))
    core, elem = _attention_core(m, gpu, s), _elementwise(m, gpu, s)
    fwd, bwd = fwd + core.forward + elem.forward, bwd + core.backward + elem.backward
    fcomm, bcomm = _tp_comm(s, tokens * h * 2, (qkv, up))
    fa2a, ba2a = moe.alltoall_time(m, tokens, t, s.ep, s.etp, s.ep_link) if m.is_moe \
        else (0.0, 0.0)
    fwd, bwd = fwd + Work(comm_s=fcomm, a2a_s=fa2a), bwd + Work(comm_s=bcomm, a2a_s=ba2a)
    if s.recompute == "full":
        bwd = bwd + fwd
    elif s.recompute == "selective":
        bwd = bwd + core.forward
    return PassTime(fwd, bwd)


def _tp_comm(s: Setup, act: float, column: tuple) -> tuple[float, float]:
    """Exposed (forward, backward) TP collective seconds; ``column`` = the column-parallel linears'
    (forward, input-gradient, weight-gradient) GEMM times, which can hide the backward traffic."""
    if s.tp == 1:
        return 0.0, 0.0
    ar, half = _collective(s, act)
    hide = s.software.tp_overlap_backward
    if not s.sp:
        return 2 * ar, sum(exposed(ar, wg if hide else 0.0) for _, _, wg in column)
    fwd = 4 * half  # two all-gathers, two reduce-scatters
    bwd = 2 * half  # all-gathers of the output gradients (the reduce-scatters' backward)
    for _, dg, wg in column:  # re-gather of the saved input, reduce-scatter of the input gradient
        bwd += exposed(half, dg if hide else 0.0) + exposed(half, wg if hide else 0.0)
    return fwd, bwd


def exposed(comm: float, behind: float) -> float:
    """Seconds a collective adds when it runs under ``behind`` seconds of GEMM (docstring)."""
    return max(0.0, comm - behind) + OVERLAP_CONTENTION * min(comm, behind)


@lru_cache(maxsize=1024)
def head_time(m: ModelSpec, gpu: GPUSpec, s: Setup) -> PassTime:
    """Final norm, vocabulary-parallel logits and cross-entropy (last pipeline stage)."""
    tokens, h = s.micro_batch * s.seq, m.hidden
    v = vocab_rows_per_rank(m, s.tp)
    tn = math.ceil(tokens / s.tp) if s.sp else tokens
    fw, dg, wg = _linear(gpu, s, tokens, v, h)
    fwd = Work(fw, stream_s(gpu, 4 * tn * h) + stream_s(gpu, CE_FORWARD_BYTES * tokens * v))
    bwd = Work(dg + wg, stream_s(gpu, 6 * tn * h) + stream_s(gpu, CE_BACKWARD_BYTES * tokens * v))
    if s.tp > 1:
        ar, half = _collective(s, tokens * h * 2)
        small = 3 * allreduce_s(tokens * 4, s.tp, s.tp_link)  # max, target logit, sum of exp
        fcomm = small + (half if s.sp else 0.0)
        back = half if s.sp else ar
        bcomm = exposed(back, wg if s.software.tp_overlap_backward else 0.0)
        fwd, bwd = fwd + Work(comm_s=fcomm), bwd + Work(comm_s=bcomm)
    return PassTime(fwd, bwd)


@lru_cache(maxsize=1024)
def embedding_time(m: ModelSpec, gpu: GPUSpec, s: Setup) -> PassTime:
    """Vocabulary-parallel lookup (+ learned positions and dropout) and its gradient (first stage)."""
    tokens, h = s.micro_batch * s.seq, m.hidden
    fbytes = 4 * tokens * h + (6 * tokens * h if m.positions else 0) + (5 * tokens * h if m.dropout else 0)
    fwd, bwd = Work(memory_s=stream_s(gpu, fbytes)), Work(memory_s=stream_s(gpu, 8 * tokens * h))
    if s.tp > 1:
        ar, half = _collective(s, tokens * h * 2)
        fwd = fwd + Work(comm_s=half if s.sp else ar)
        bwd = bwd + Work(comm_s=half if s.sp else 0.0)
    return PassTime(fwd, bwd)
