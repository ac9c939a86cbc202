"""Start-up of the compiled decode step: cold vs warm inductor cache, with and without freezing.

    python benchmarks/compile_bench.py --dtype float32 [--max-seqs 1] [--tokens 64]

For each of ``freezing`` off and on, a fresh inductor cache directory (``TORCHINDUCTOR_CACHE_DIR``)
and two new processes in turn: the first compiles cold (empty cache), the second starts warm
(same directory: inductor's FX-graph and AOT-autograd caches). Each process builds SmolLM2 at
tp=1 on all cores, times :meth:`StaticStep.warmup` (every batch bucket up to ``--max-seqs``),
then decodes ``--tokens`` greedy tokens three times (median tokens per second), so the cost of
freezing at start-up is set beside what it buys per token.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child(dtype: str, freezing: bool, max_seqs: int, tokens: int) -> dict:
    import torch

    from shardwise.checkpoint.source import build_model, resolve
    from shardwise.serve.kv import Chunk, PagedKVCache
    from shardwise.serve.step import StaticStep, StepOptions
    t0 = time.perf_counter()
    model = build_model(resolve("smollm2-135m"), dtype=getattr(torch, dtype)).eval()
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        cache = PagedKVCache(model, 32, 16)
        step = StaticStep(model, cache, StepOptions(max_seqs=max_seqs, max_context=512,
                                                    freezing=freezing))
        t0 = time.perf_counter()
        step.warmup()
        compile_s = time.perf_counter() - t0
        blocks = list(range(cache.num_blocks))
        rates = []
        for _ in range(3):
            tok = 1
            t0 = time.perf_counter()
            for pos in range(tokens):
                tok = int(step([Chunk(0, [tok], pos, blocks, True)]).argmax(-1)[0])
            rates.append(tokens / (time.perf_counter() - t0))
    return {"load_s": round(load_s, 2), "compile_s": round(compile_s, 2),
            "decode_tps": round(statistics.median(rates), 1), "buckets": step.buckets}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--max-seqs", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--freezing", default="0,1", help="comma-separated 0/1 (default both)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        print(json.dumps(child(a.dtype, bool(a.child), a.max_seqs, a.tokens)))
        return 0
    cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t")
    print(f"{cpu} | {os.cpu_count()} CPUs | load {os.getloadavg()[0]:.2f} | SmolLM2 tp=1 "
          f"{a.dtype}, buckets up to {a.max_seqs}, decode {a.tokens} tokens", flush=True)
    print("| freezing | start | compile s | load s | decode tok/s |\n|---|---|---|---|---|")
    results = {}
    for freeze in (int(f) for f in a.freezing.split(",")):
        with tempfile.TemporaryDirectory(prefix="inductor-") as cache_dir:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
            for start in ("cold", "warm"):
                out = subprocess.run([sys.executable, __file__, "--child", str(freeze), "--dtype",
                                      a.dtype, "--max-seqs", str(a.max_seqs), "--tokens",
                                      str(a.tokens)], env=env, capture_output=True, text=True)
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"child freezing={freeze} {start} failed")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results[f"freezing={freeze} {start}"] = r
                print(f"| {'on' if freeze else 'off'} | {start} | {r['compile_s']:.1f} | "
                      f"{r['load_s']:.1f} | {r['decode_tps']:.1f} |", flush=True)
    print(f"load at the end {os.getloadavg()[0]:.2f}")
    print(json.dumps(results), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
