"""bf16 products of many rows: AMX tiles against the AVX-512 path, one process, interleaved.

    python benchmarks/amx_bench.py --rows 1,2,3,4,8,16,32,64,128 --rounds 7

The products of one SmolLM2-135M forward at tp=1 (per layer: the fused q/k/v, o, the SwiGLU
gate/up and down products, 30 layers, then the 49152-wide head), each weight in the engines'
tiled bf16 layout (:class:`shardwise.kernels.Tiled`), run for every row count with
``shardwise::linear_tiled`` on AMX tiles and again with the AVX-512 path
(``shardwise::set_linear_amx(False)``), alternating within each round. Random weights: the time
of a product does not depend on its values. Printed: the CPU, ms per forward's products on each
path (medians) and the AMX speedup (ratio of medians; per-round ratios' median and range). This
is what sets the row count from which ``linear.cpp`` takes the tiles (``AMX_MIN_ROWS``; issue 10,
benchmarks/RESULTS.md). Without AMX (or the kernels) it says so and exits.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# SmolLM2-135M at tp=1: (output rows, input columns, SwiGLU form) of a layer's products
LAYER = ((960, 576, False), (576, 576, False), (3072, 576, True), (576, 1536, False))
HEAD = (49152, 576, False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,3,4,8,16,32,64,128")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()
    from shardwise import kernels
    from shardwise.bench import cpu_model
    print(f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}")
    if not kernels.load() or torch.bfloat16 not in kernels.enable():
        sys.exit(f"no bf16 kernels here: {kernels.status()}")
    if not torch.ops.shardwise.linear_amx():
        sys.exit("AMX tiles are not in use here (the CPU lacks them, the kernel refused the tile "
                 "state, or SHARDWISE_AMX=0): nothing to compare")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    weights = [(kernels.Tiled(torch.randn(n, k, dtype=torch.bfloat16) * 0.05, swiglu=glu), k)
               for _ in range(args.layers) for n, k, glu in LAYER]
    weights.append((kernels.Tiled(torch.randn(HEAD[0], HEAD[1], dtype=torch.bfloat16) * 0.05),
                    HEAD[1]))
    ops = torch.ops.shardwise

    def forward(xs: dict[int, torch.Tensor]) -> float:
        t0 = time.perf_counter()
        for form, k in weights:
            (ops.linear_tiled_swiglu if form.swiglu else ops.linear_tiled)(xs[k], form.w, None)
        return time.perf_counter() - t0

    print(f"{len(weights)} products, {sum(f.nbytes() for f, _ in weights) / 1e6:.0f} MB of "
          f"bf16 weights; {args.rounds} rounds\n")
    print("| rows | AVX-512 ms | AMX ms | AMX speedup | per round (min-max) |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for m in (int(r) for r in args.rows.split(",")):
            xs = {k: torch.randn(m, k, dtype=torch.bfloat16) for k in (576, 1536)}
            times: dict[bool, list[float]] = {True: [], False: []}
            for amx in (True, False):  # warm both
                ops.set_linear_amx(amx)
                forward(xs)
            for _ in range(args.rounds):
                for amx in (True, False):
                    ops.set_linear_amx(amx)
                    times[amx].append(forward(xs))
            ops.set_linear_amx(True)
            a, v = statistics.median(times[True]), statistics.median(times[False])
            per = [y / x for x, y in zip(times[True], times[False])]
            print(f"| {m} | {v * 1e3:.2f} | {a * 1e3:.2f} | {v / a:.2f}x | "
                  f"{statistics.median(per):.2f} ({min(per):.2f}-{max(per):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
