"""One StepOptions switch on and off, interleaved in one process: decode step times by batch and
context (SmolLM2-135M-Instruct, tp=1, all cores).

    python benchmarks/step_options.py --switch paged_attention [--dtype bfloat16] [--rounds 5]
    python benchmarks/step_options.py --switch shared_graph

``paged_attention``: the decode step's attention over the paged cache in place
(``shardwise::paged_decode``) vs the keys gathered into a copy, then SDPA. ``shared_graph``: one
compiled graph for every batch bucket above 1 vs a graph per bucket (also reports the warm-up,
i.e. the compile time of each, with whatever inductor cache the machine has). Each round runs
every (setting, batch, context) once: 8 timed steps after one untimed; medians of the rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from shardwise.bench import cpu_model  # noqa: E402
from shardwise.checkpoint.source import build_model, resolve  # noqa: E402
from shardwise.serve.kv import Chunk, PagedKVCache  # noqa: E402
from shardwise.serve.step import StaticStep, StepOptions  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--switch", required=True, choices=("paged_attention", "shared_graph"))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--shapes", default="1x30,1x300,16x30,16x300", help="BATCHxCONTEXT,...")
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    per = -(-(max(c for _, c in shapes) + 2) // 16)  # blocks per sequence
    nseq = max(b for b, _ in shapes)
    model = build_model(resolve("smollm2-135m"), group=None,
                        dtype=getattr(torch, args.dtype)).eval()
    print(f"{cpu_model()} | {torch.get_num_threads()} threads | {args.dtype} | load "
          f"{os.getloadavg()[0]:.2f} | {args.switch}")
    res: dict[tuple, list[float]] = {}
    with torch.inference_mode():
        steps = {}
        for on in (True, False):
            st = StaticStep(model, PagedKVCache(model, nseq * per + 1, 16),
                            StepOptions(max_seqs=nseq, **{args.switch: on}))
            t0 = time.perf_counter()
            st.warmup()
            print(f"{args.switch}={on}: warm-up (compile) {time.perf_counter() - t0:.1f} s")
            steps[on] = st
        for _ in range(args.rounds):
            for on, st in steps.items():
                for b, ctx in shapes:
                    chunks = [Chunk(i, [7], ctx, list(range(i * per, (i + 1) * per)), True)
                              for i in range(b)]
                    st(chunks)
                    t0 = time.perf_counter()
                    for _ in range(8):
                        st(chunks)
                    res.setdefault((b, ctx, on), []).append((time.perf_counter() - t0) / 8)
    print(f"| batch | context | {args.switch} on | off | off / on |")
    print("|---|---|---|---|---|")
    for b, ctx in shapes:
        on, off = (statistics.median(res[(b, ctx, s)]) * 1e3 for s in (True, False))
        print(f"| {b} | {ctx} | {on:.1f} ms | {off:.1f} ms | {off / on:.2f} |")


if __name__ == "__main__":
    main()
