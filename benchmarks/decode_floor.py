"""How far a batch-1 decode step is from its floor: the step against its own products, and the
products against the machine's read bandwidth, in one process, interleaved.

    python benchmarks/decode_floor.py --dtype bfloat16 --rounds 7

SmolLM2-135M-Instruct at tp=1 (all cores), the compiled :class:`~shardwise.serve.step.StaticStep`
as ``shardwise bench decode`` runs it. Each round, in this order:

* ``read``: the machine's read bandwidth (:func:`shardwise.bench.decode.read_bandwidth`);
* ``step``: ``--tokens`` decode steps with the greedy pick (a fresh context each round);
* ``products``: the step's tiled weight products alone, each called once per step from a Python
  loop on inputs of the right width, as many times.

Printed per round and as medians: ms per step of each, the step's excess over its products (what
everything besides them costs: norms, rope, attention, the graph call, dynamo, the inputs, the
pick; measured against Python's own calls to the products, which are not free either), and the
products' GB/s as a share of that round's read bandwidth (issue 10, benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    if not 1 <= args.tokens <= 500:
        ap.error(f"--tokens {args.tokens}: 1-500 fit the 512-token cache")

    from shardwise import kernels
    from shardwise.bench import cpu_model
    from shardwise.bench.decode import read_bandwidth
    from shardwise.checkpoint.source import build_model, resolve
    from shardwise.mesh import Mesh
    from shardwise.sampling import SamplingParams, sample
    from shardwise.serve.kv import Chunk, PagedKVCache
    from shardwise.serve.step import StaticStep, StepOptions

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    mesh = Mesh.init(tp=1)
    model = build_model(resolve("smollm2-135m"), group=mesh.tp_group,
                        dtype=getattr(torch, args.dtype)).eval()
    n = args.tokens
    with torch.inference_mode():
        cache = PagedKVCache(model, 32, 16)  # as bench decode: 512 tokens
        step = StaticStep(model, cache, StepOptions(max_seqs=1, max_context=512))
        step.warmup()
        head, blocks, greedy = model.lm_head, list(range(cache.num_blocks)), [SamplingParams()]
        # the step's weight products: each tiled form once (a tied embedding is the head's)
        forms = list({id(f): f for f in (getattr(m, "qweight", None) for m in model.modules())
                      if isinstance(f, kernels.Tiled)}.values())
        nbytes = sum(f.nbytes() for f in forms)
        inputs = [torch.randn(1, f.k, dtype=f.dtype) for f in forms]

        def decode() -> None:
            tok = 1
            for pos in range(1, n + 1):
                logits = step([Chunk(0, [tok], pos, blocks, True)])
                tok = int(sample(logits, greedy, [None], start=head.start,
                                 vocab=head.num_embeddings, group=None)[0])

        def products() -> None:
            for _ in range(n):
                for f, x in zip(forms, inputs):
                    f.linear(x)

        def timed(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) / n * 1e3

        decode(), products()
        print(f"{cpu_model()}, {cores} cores, torch {torch.__version__}, {args.dtype}, "
              f"{len(forms)} products, {nbytes / 1e6:.0f} MB per step")
        print("| round | read GB/s | step ms | products ms | step - products ms | "
              "products GB/s | of read |")
        print("|---|---|---|---|---|---|---|")
        rows = []
        for r in range(args.rounds):
            bw = read_bandwidth(cores)
            s, p = timed(decode), timed(products)
            gb = nbytes / p / 1e6
            rows.append((bw, s, p, s - p, gb, gb / bw))
            print(f"| {r + 1} | {bw:.1f} | {s:.2f} | {p:.2f} | {s - p:.2f} | {gb:.1f} | "
                  f"{gb / bw:.0%} |", flush=True)
        med = [statistics.median(c) for c in zip(*rows)]
        print(f"| median | {med[0]:.1f} | {med[1]:.2f} | {med[2]:.2f} | {med[3]:.2f} | "
              f"{med[4]:.1f} | {med[5]:.0%} |")


if __name__ == "__main__":
    main()
