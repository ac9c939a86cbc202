"""The dense products of inference over SmolLM2-135M's weight shapes: the tiled kernel
(``shardwise::linear_tiled``, what the engines run) beside the row-major decode kernel
(``shardwise::linear``), ``F.linear`` (MKL / oneDNN bf16) and oneDNN's fp32 linear, by rows.

    python benchmarks/linear_bench.py [--rounds 3] [--rows 1,4,16,64,128] [--threads 2]

Each round times every contender once over the model's 121 products (QKV, O, gate-up, down per
layer and the tied head; random weights of the model's shapes), interleaved; medians of the
rounds. GB/s = the weights' bytes over the time (what a decode step streams).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from shardwise import kernels  # noqa: E402
from shardwise.bench import cpu_model  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", default="1,4,16,64,128")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--dtype", default="bfloat16,float32")
    args = p.parse_args()
    if not kernels.load() or not kernels.enable():
        sys.exit(f"native kernels unavailable here: {kernels.status()}")
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()} | {args.threads} threads | torch {torch.__version__} | load "
          f"{os.getloadavg()[0]:.2f}")
    print("| dtype | rows | contender | ms per model | GB/s | / tiled |")
    print("|---|---|---|---|---|---|")
    for dtype in [getattr(torch, d) for d in args.dtype.split(",")]:
        torch.manual_seed(0)
        ws = [torch.randn(n, k).to(dtype) for n, k in SHAPES]
        forms = [kernels.Tiled(w) for w in ws]
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        for m in (int(r) for r in args.rows.split(",")):
            xs = {k: torch.randn(m, k).to(dtype) for k in (576, 1536)}
            tiled = [(xs[w.shape[1]], f.w) for w, f in zip(ws, forms)]
            rows = [(xs[w.shape[1]], w) for w in ws]
            runs = {"tiled": (torch.ops.shardwise.linear_tiled, tiled), "F.linear": (F.linear, rows)}
            if m <= kernels.MAX_ROWS:
                runs["row-major"] = (torch.ops.shardwise.linear, rows)
            if dtype == torch.float32 and torch.backends.mkldnn.is_available():
                runs["oneDNN"] = (lambda x, w: torch.ops.mkldnn._linear_pointwise(
                    x, w, None, "none", [], ""), rows)
            times: dict[str, list[float]] = {}
            with torch.inference_mode():
                for _ in range(args.rounds):
                    for name, (fn, pairs) in runs.items():
                        t0 = time.perf_counter()
                        for x, w in pairs:
                            fn(x, w)
                        times.setdefault(name, []).append(time.perf_counter() - t0)
            base = statistics.median(times["tiled"])
            for name, v in times.items():
                t = statistics.median(v)
                print(f"| {str(dtype)[6:]} | {m} | {name} | {t * 1e3:.1f} | {nbytes / t / 1e9:.1f} | "
                      f"{t / base:.2f} |")


if __name__ == "__main__":
    main()
