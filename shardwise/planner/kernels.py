"""Seconds of one kernel on one GPU: a GEMM from its shape, a memory-bound operator from its bytes.

**GEMM** ``C (m x n) = A (m x k) B (k x n)``, ``batch`` independent products, 16-bit operands:

    flops = 2 m n k batch                 bytes = 2 (m k + k n + m n) batch
    time  = max(flops / (ceiling x util), bytes / stream bandwidth)

``ceiling`` is the GPU's measured Maximum Achievable Matmul rate (MAMF, see ``gpus.py``): what the best
shape reaches, not the datasheet peak. ``util`` is the tile and wave quantization of NVIDIA's "Matrix
Multiplication Background User's Guide" (DU-09799-001, sections 2.3, 3.1, 3.2): cuBLAS splits C into
thread-block tiles, 256 x 128 or 128 x 256 being the most efficient; a partly filled edge tile costs a
whole tile, and the tiles run in waves of one per SM (A100: 108 SMs), so 117 tiles take two waves:

    util = m n batch / (waves x SMs x tile_m x tile_n),  waves = ceil(tiles / SMs)

taking the better of the two tile orientations. A thin per-rank slice (small n) or a small hidden size
fills few tiles and runs well below the ceiling; a skinny GEMM (m or n under 128, e.g. decode) is
memory-bound and cuBLAS runs it with small-tile or split-K kernels, so only the byte bound applies.

**Memory-bound operators** (norms, softmax, dropout, elementwise, optimizer step) move ``bytes`` at the
datasheet bandwidth times an efficiency that grows with the transfer, from Calculon's A100 system
description (Isaev et al., SC'23; calculon-ai/calculon systems/a100_80g.json, "mem1" MB_efficiency):
30% for tiny, 60% at 1 MB, 75% at 10 MB, 90% from 100 MB; interpolated here in log10(MB).

**Fused attention** (FlashAttention-2, Dao 2023): the s x s scores never reach memory; its FLOPs
(4 b s^2 q forward, half of it under a causal mask; backward 2.5x forward) run at a fraction of the
dense peak. The paper's abstract reports 50-73% of the A100's theoretical maximum; this model takes
65% forward and 55% backward, inside that range and below the GEMM ceiling. No validation row runs
fused attention (the published Megatron rows predate it), so these two figures are not validated.
"""
from __future__ import annotations

import math
from functools import lru_cache

from .gpus import GPUSpec

TILES = ((256, 128), (128, 256))  # the two most efficient cuBLAS tiles (NVIDIA guide, section 2.3)
# Fitted on the validation table's calibration rows only (benchmarks/planner_fit.py; docs/planner.md):
# the share of the MAMF ceiling, and of the streaming bandwidth, that a whole training step sustains
# (clocks under the whole node's power load, the cuBLAS and kernels of the software of the time).
SUSTAINED_MATMUL = 0.87
SUSTAINED_STREAM = 0.82
SKINNY = 128  # below this m or n the GEMM is memory-bound; tile quantization is not modelled
# (MB transferred, fraction of datasheet bandwidth): Calculon a100_80g.json "mem1" MB_efficiency
STREAM_CURVE = ((0.0, 0.3), (1.0, 0.6), (10.0, 0.75), (100.0, 0.9))
FLASH_FORWARD = 0.65  # FlashAttention-2 forward, fraction of dense peak (Dao 2023: 50-73%)
FLASH_BACKWARD = 0.55  # backward, inside the same range


def stream_efficiency(nbytes: float) -> float:
    """Fraction of the datasheet bandwidth a transfer of ``nbytes`` reaches (STREAM_CURVE)."""
    mb = nbytes / 1e6
    pts = STREAM_CURVE
    if mb >= pts[-1][0]:
        return pts[-1][1]
    if mb <= pts[1][0]:  # below 1 MB: linear from the tiny-transfer figure
        return pts[0][1] + (pts[1][1] - pts[0][1]) * mb / pts[1][0]
    for (x0, y0), (x1, y1) in zip(pts[1:], pts[2:]):
        if mb <= x1:
            f = (math.log10(mb) - math.log10(x0)) / (math.log10(x1) - math.log10(x0))
            return y0 + f * (y1 - y0)
    return pts[-1][1]


def stream_s(gpu: GPUSpec, nbytes: float) -> float:
    """Seconds to move ``nbytes`` through HBM in one memory-bound kernel."""
    if nbytes <= 0:
        return 0.0
    return nbytes / (gpu.hbm_GBps * 1e9 * stream_efficiency(nbytes) * SUSTAINED_STREAM)


def quantization(gpu: GPUSpec, m: int, n: int, batch: int = 1) -> float:
    """Useful fraction of the tile waves a GEMM launches (1.0 for skinny GEMMs, see above)."""
    if m < SKINNY or n < SKINNY or not gpu.sms:
        return 1.0
    best = 0.0
    for tm, tn in TILES:
        tiles = math.ceil(m / tm) * math.ceil(n / tn) * batch
        waves = math.ceil(tiles / gpu.sms)
        best = max(best, m * n * batch / (waves * gpu.sms * tm * tn))
    return best


@lru_cache(maxsize=8192)
def gemm_s(gpu: GPUSpec, m: int, n: int, k: int, batch: int = 1, precision: str = "bf16") -> float:
    """Seconds of ``batch`` GEMMs (m x k) @ (k x n) with 16-bit operands (module docstring)."""
    if min(m, n, k, batch) <= 0:
        return 0.0
    flops = 2.0 * m * n * k * batch
    ceiling = gpu.peak_flops(precision) * gpu.matmul_fraction * SUSTAINED_MATMUL
    compute = flops / (ceiling * quantization(gpu, m, n, batch))
    return max(compute, stream_s(gpu, 2.0 * (m * k + k * n + m * n) * batch))


def gemm_efficiency(gpu: GPUSpec, m: int, n: int, k: int, precision: str = "bf16") -> float:
    """Achieved FLOP/s of one GEMM over the datasheet peak: 0.87 for a large A100 GEMM."""
    return 2.0 * m * n * k / gemm_s(gpu, m, n, k, 1, precision) / gpu.peak_flops(precision)


def flash_attention_s(gpu: GPUSpec, flops: float, *, backward: bool, precision: str = "bf16") -> float:
    """Seconds of fused attention doing ``flops`` (already halved for a causal mask)."""
    eff = FLASH_BACKWARD if backward else FLASH_FORWARD
    return flops / (gpu.peak_flops(precision) * eff * SUSTAINED_MATMUL)
