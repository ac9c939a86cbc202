"""The serving engine's eager mixed step (decodes beside a prompt chunk), with and without the
native attention over the paged cache and the native elementwise pieces, interleaved in one
process (SmolLM2-135M-Instruct, tp=1, all cores).

    python benchmarks/mixed_step.py [--dtype bfloat16] [--rounds 5]

A step: 15 sequences decoding at 100 tokens of context beside one prompt chunk of 241 tokens (the
256-token budget of ``shardwise serve``), the chunk either a prompt's first (start 0) or a long
prompt's third (start 482, its keys 723). Settings: ``paged`` (``PagedKVCache.paged``: the
prompt chunk through ``shardwise::prefill_attention`` and the decode rows through
``shardwise::paged_decode``, each reading the cache in place; off: keys gathered, then
``scaled_dot_product_attention``, with the chunk's mask when it does not start at 0) and
``pieces`` (``shardwise.kernels.native_pieces``: RMSNorm, SiLU-and-multiply and rope one native
pass each; off: torch's operators). Each round runs every (setting, chunk) for 3 timed steps
after one untimed; medians of the rounds.
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

DECODES, CONTEXT, BUDGET, BS = 15, 100, 256, 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    model = build_model(resolve("smollm2-135m"), group=None,
                        dtype=getattr(torch, args.dtype)).eval()
    per = -(-(CONTEXT + 1) // BS)
    n = BUDGET - DECODES
    starts = (0, 2 * n)
    prompt_blocks = -(-(max(starts) + n) // BS)
    cache = PagedKVCache(model, DECODES * per + prompt_blocks + 1, BS)
    step = StaticStep(model, cache, StepOptions(compile=False, max_seqs=DECODES + 1))
    first = DECODES * per
    blocks = list(range(first, first + prompt_blocks))
    decodes = [Chunk(i, [1000 + i], CONTEXT, list(range(i * per, (i + 1) * per)), True)
               for i in range(DECODES)]
    print(f"{cpu_model()} | {torch.get_num_threads()} threads | {args.dtype} | load "
          f"{os.getloadavg()[0]:.2f}")
    settings = [(paged, pieces) for paged in (False, True) for pieces in (False, True)]
    res: dict[tuple, list[float]] = {}
    saved = kernels._PIECES
    try:
        with torch.inference_mode():
            for _ in range(args.rounds):
                for paged, pieces in settings:
                    cache.paged, kernels._PIECES = paged, pieces and saved
                    for start in starts:
                        chunks = decodes + [Chunk(DECODES, list(range(2000, 2000 + n)), start,
                                                  blocks, True)]
                        step(chunks)
                        t0 = time.perf_counter()
                        for _ in range(3):
                            step(chunks)
                        res.setdefault((paged, pieces, start), []).append(
                            (time.perf_counter() - t0) / 3)
    finally:
        cache.paged, kernels._PIECES = step.paged, saved
    print("| prompt chunk | neither | pieces | paged | both | neither / both |")
    print("|---|---|---|---|---|---|")
    for start in starts:
        ms = [statistics.median(res[(a, b, start)]) * 1e3 for a, b in settings]
        print(f"| {n} tokens at {start} | " + " | ".join(f"{m:.1f} ms" for m in ms) +
              f" | {ms[0] / ms[3]:.2f} |")


if __name__ == "__main__":
    main()
