"""Prefill and decode with and without SwiGLU fused into the gate/up product, interleaved in one
process (SmolLM2-135M-Instruct, tp=1, all cores, the compiled decode step).

    python benchmarks/swiglu_step.py [--dtype bfloat16] [--rounds 9] [--fused-first]

Two copies of the model: one laid out by ``kernels.tile_weights(model)`` (each MLP's gate and up
tiles in pairs, ``shardwise::linear_tiled_swiglu``: silu(gate) * up in the product's epilogue),
one by ``tile_weights(model, swiglu=False)`` (the product of the plain tiling, then
``shardwise::silu_mul``). A round runs each copy once: a 128-token prefill (llama-bench's pp128),
then 64 greedy decode steps; the per-round ratios (unfused time / fused time), their median and
range. The greedy tokens of the two must agree (the roundings are the same; only the order of
the products' sums may differ). ``--fused-first`` swaps which copy runs first in a round (a
check on order effects, which were a few percent in decode on this VM).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from shardwise import kernels  # noqa: E402
from shardwise.bench import cpu_model  # noqa: E402
from shardwise.checkpoint.source import build_model, resolve  # noqa: E402
from shardwise.serve.kv import Chunk, PagedKVCache  # noqa: E402
from shardwise.serve.step import StaticStep, StepOptions  # noqa: E402

PREFILL, DECODE = 128, 64


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--fused-first", action="store_true")
    args = p.parse_args()
    kernels.enable()
    order = [("unfused", False), ("fused", True)]
    if args.fused_first:
        order.reverse()
    steps = {}
    for name, swiglu in order:
        model = build_model(resolve("smollm2-135m"), group=None,
                            dtype=getattr(torch, args.dtype)).eval()
        kernels.tile_weights(model, swiglu=swiglu)
        step = StaticStep(model, PagedKVCache(model, 32, 16),
                          StepOptions(compile=True, max_seqs=1, max_context=512))
        with torch.inference_mode():
            step.warmup()
        steps[name] = step
    prompt = torch.randint(100, 40000, (PREFILL,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.tolist()
    blocks = list(range(32))
    times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in steps}
    tokens: dict[str, list[int]] = {}
    print(f"{cpu_model()} | {torch.get_num_threads()} threads | {args.dtype} | load "
          f"{os.getloadavg()[0]:.2f}")
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, step in steps.items():
                t0 = time.perf_counter()
                tok = int(step([Chunk(0, prompt, 0, blocks, True)]).argmax(-1)[0])
                times[name]["prefill"].append(time.perf_counter() - t0)
                seq = [tok]
                t0 = time.perf_counter()
                for pos in range(PREFILL, PREFILL + DECODE):
                    tok = int(step([Chunk(0, [tok], pos, blocks, True)]).argmax(-1)[0])
                    seq.append(tok)
                times[name]["decode"].append((time.perf_counter() - t0) / DECODE)
                tokens[name] = seq
    if tokens["fused"] != tokens["unfused"]:
        sys.exit("the fused and unfused copies chose different greedy tokens")
    print("| phase | unfused ms | fused ms | unfused / fused: median (min-max) |")
    print("|---|---|---|---|")
    for phase in ("prefill", "decode"):
        a, b = times["unfused"][phase], times["fused"][phase]
        r = [x / y for x, y in zip(a, b)]
        print(f"| {phase} | {statistics.median(a) * 1e3:.2f} | {statistics.median(b) * 1e3:.2f} | "
              f"{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f}) |")
    print(f"greedy tokens identical over {DECODE + 1} steps")


if __name__ == "__main__":
    main()
