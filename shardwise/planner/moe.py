"""What a mixture-of-experts layer costs, as ``shardwise.models.moe`` runs it.

Placement (``models.py``): a TP group of t ranks, ``ep`` such groups beside it running different
tokens, each expert split over ``etp`` ranks of its TP group (``etp = t``: tensor-parallel experts;
``etp = 1``: whole experts, expert parallelism within the TP group); ``slots = ep x t / etp``.
Routing is assumed balanced (the load-balancing loss's aim): a rank whose TP group holds T tokens
runs ``n = T k / (t / etp)`` expert rows (every TP group sends its tokens' assignments for the
experts of a rank's block to that rank), spread over its experts.

Time per layer and micro-batch on one rank:

    router      GEMM (T, E, h)
    experts     per local expert: gate/up (n_e, 2 f/etp, h) and down (n_e, h, f/etp), n_e = n / experts
    SwiGLU      on n x f/etp, 6 bytes forward and 10 backward per element (as the dense MLP)
    routing     softmax and top-k over T x E (4 + 8 bytes), gather and weighted scatter of the n
                rows (8 bytes per element each way), forward and backward alike
    all-to-all  ep > 1: dispatch and combine forward, the same two backward, each of the rank's
                n x h x 2 bytes, (ep - 1) / ep of it leaving the rank; the counts before them cost
                the link's latency

The TP all-reduces are the dense MLP's: one per MoE block forward and one backward.

Decode reads, per step, the dense weights and the experts some token of the step chose: with
``a = ep x b x k`` assignments in the EP group spread over E experts, an expert is read with
probability ``p = 1 - (1 - 1/E)^a``. The step waits for the busiest rank: a slot of L experts reads
``L p`` on average, binomially spread; the busiest of S slots is taken as ``mean + sqrt(2 ln S)``
standard deviations (the Gaussian extreme), at least one expert once any token is routed, at most
L. A batch of one at top-2 touches 2 of Mixtral's 8 experts: a TP rank (one slot of 8 experts,
1/t of each) reads 2/t of an expert's bytes, a whole-expert rank holding one of them all of it.

Activations stored per layer and micro-batch (what the model saves; A = 2 under 16-bit autocast,
4 in fp32), replacing the dense MLP's ``A 4f`` per token::

    per token     4 E (router probabilities, fp32) + 8 k (top-k indices)
                  + 4 k + 4 (the top-k renormalisation, when the family renormalises)
    per row       A (3 h + 4 f/etp + 1) + 16     rows in, gate/up output, silu, product, the
                                                 expert output, its weight and their product
                                                 (the scatter-add keeps it); two int64 indices
                  + 16 with ep > 1               the regrouping of the rows that arrived
    selective     the SwiGLU is rebuilt in backward: A 2 f/etp less per row
"""
from __future__ import annotations

import math

from .collectives import alltoall_s
from .gpus import GPUSpec, Link
from .kernels import gemm_s, stream_s
from .models import ModelSpec, expert_slots, experts_per_rank


def blocks(m: ModelSpec, tp: int, etp: int | None) -> int:
    return tp // (etp or tp)


def expert_width(m: ModelSpec, tp: int, etp: int | None) -> int:
    return math.ceil(m.ffn / (etp or tp))


def routed_rows(m: ModelSpec, tokens: float, tp: int, etp: int | None) -> float:
    """Expert rows one rank runs for ``tokens`` tokens per TP group (balanced routing)."""
    return tokens * m.top_k / blocks(m, tp, etp)


def linears(m: ModelSpec, gpu: GPUSpec, tokens: int, tp: int, ep: int, etp: int | None,
            precision: str) -> list[tuple[float, float, float]]:
    """(forward, input-gradient, weight-gradient) seconds of the router and the experts' GEMMs."""
    def lin(rows: int, n: int, k: int, times: int = 1) -> tuple[float, float, float]:
        return (times * gemm_s(gpu, rows, n, k, 1, precision),
                times * gemm_s(gpu, rows, k, n, 1, precision),
                times * gemm_s(gpu, k, n, rows, 1, precision))
    local = experts_per_rank(m, tp, ep, etp)
    rows = max(1, math.ceil(routed_rows(m, tokens, tp, etp) / local))
    f, h = expert_width(m, tp, etp), m.hidden
    return [lin(tokens, m.experts, h), lin(rows, 2 * f, h, local), lin(rows, h, f, local)]


def elementwise(m: ModelSpec, gpu: GPUSpec, tokens: int, tp: int, etp: int | None
                ) -> tuple[float, float]:
    """(forward, backward) seconds of SwiGLU, the router's softmax and top-k, gather/scatter."""
    n = routed_rows(m, tokens, tp, etp)
    f, h = expert_width(m, tp, etp), m.hidden
    route = stream_s(gpu, 12 * tokens * m.experts)
    move = stream_s(gpu, 16 * n * h)
    return (stream_s(gpu, 6 * n * f) + route + move, stream_s(gpu, 10 * n * f) + route + move)


def alltoall_time(m: ModelSpec, tokens: int, tp: int, ep: int, etp: int | None, link: Link,
                  bytes_per: float = 2) -> tuple[float, float]:
    """(forward, backward) seconds of the EP all-to-alls of one layer (module docstring)."""
    if ep == 1:
        return 0.0, 0.0
    payload = routed_rows(m, tokens, tp, etp) * m.hidden * bytes_per
    one = alltoall_s(payload, ep, link)
    return 2 * one + link.alpha_s, 2 * one


def activation_bytes(m: ModelSpec, tokens: int, tp: int, ep: int, etp: int | None, *,
                     recompute: str, a_bytes: float, normalize: bool = True) -> float:
    """The MoE MLP's stored bytes for ``tokens`` tokens per TP group (module docstring)."""
    f = expert_width(m, tp, etp)
    per_token = 4 * m.experts + 8 * m.top_k + ((4 * m.top_k + 4) if normalize else 0)
    per_row = a_bytes * (3 * m.hidden + 4 * f + 1) + 16 + (16 if ep > 1 else 0)
    if recompute == "selective":
        per_row -= a_bytes * 2 * f
    return tokens * per_token + routed_rows(m, tokens, tp, etp) * per_row


def touched(m: ModelSpec, assignments: float) -> float:
    """Probability that an expert is chosen by at least one of ``assignments`` (uniform)."""
    return 1 - (1 - 1 / m.experts) ** assignments


def decode_expert_params(m: ModelSpec, tp: int, ep: int, etp: int | None,
                         sequences: float) -> float:
    """Expert parameters the busiest rank reads in a decode step of ``sequences`` tokens per TP
    group (module docstring)."""
    p = touched(m, ep * sequences * m.top_k)
    slots = expert_slots(m, tp, ep, etp)
    local = experts_per_rank(m, tp, ep, etp)
    spread = math.sqrt(2 * math.log(slots) * local * p * (1 - p)) if slots > 1 else 0.0
    busiest = min(local, max(local * p + spread, 1.0 if sequences > 0 else 0.0))
    return busiest * m.expert_params(expert_width(m, tp, etp))
