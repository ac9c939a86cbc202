"""Where a batch-1 decode step's time goes: matmuls vs everything else vs collectives.

    python benchmarks/profile_decode.py --tp 1,2 --dtype float32,bfloat16
        [--mode legacy|eager|compiled|mixed] [--quant int8|int4]

One process per rank (cores split evenly, pinned), SmolLM2-135M-Instruct, a 16-token prompt, then
``--steps`` decode steps under ``torch.profiler``; rank 0's table. *matmul* is the self time of
the matrix-multiply operators (aten mm/addmm/bmm/linear, oneDNN/MKL packed linears), *collectives*
the shardwise collective operators, *other* the rest of the step's wall time (elementwise
kernels, attention, Python and dispatch). ``legacy`` runs the model with the contiguous
``KVCache`` hook (the path before the static step, also runnable on older trees); ``eager`` and
``compiled`` run :class:`shardwise.serve.step.StaticStep`; ``mixed`` profiles the serving engine's
mixed step instead (eager, one flat row): 15 sequences decoding at 100 tokens of context beside a
241-token prompt chunk, the 256-token budget of ``shardwise serve``'s default.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul",
          "mkldnn::_linear_pointwise", "mkl::_mkl_linear", "aten::_weight_int8pack_mm",
          "mkldnn::_linear_pointwise.binary", "aten::mv", "shardwise::linear",
          "shardwise::qlinear", "shardwise::linear_tiled", "shardwise::linear_tiled_swiglu",
          "aten::_weight_int4pack_mm_for_cpu")
TOP = int(os.environ.get("PROFILE_TOP", "8"))  # operators listed by self time
COLLECTIVES = ("shardwise::all_reduce", "shardwise::all_gather", "shardwise::shm_all_reduce")


def classify(events, wall_us: float, steps: int) -> dict[str, float]:
    """ms per step: matmul, collectives, other (= wall - matmul - collectives)."""
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL)
    coll = sum(e.cpu_time_total for e in events if e.key in COLLECTIVES)
    return {"step_ms": wall_us / steps / 1e3, "matmul_ms": mm / steps / 1e3,
            "collectives_ms": coll / steps / 1e3,
            "other_ms": max(0.0, wall_us - mm - coll) / steps / 1e3}


def _legacy(model, prompt, n):
    from shardwise.models.cache import KVCache
    cache = KVCache(model, 1, len(prompt) + n + 8)
    ids = torch.tensor([prompt])

    def step():
        nonlocal ids
        logits = model(ids, cache.positions(1, ids.shape[1]), attend=cache.attend, rows=[-1])
        cache.advance(ids.shape[1])
        ids = logits[:, -1].argmax(-1, keepdim=True)  # local argmax: enough to keep going
    return step


def _static(model, prompt, n, compiled):
    from shardwise.serve.kv import Chunk, PagedKVCache
    from shardwise.serve.step import StaticStep, StepOptions
    cache = PagedKVCache(model, -(-(len(prompt) + n + 8) // 16), 16)
    st = StaticStep(model, cache, StepOptions(compile=compiled, max_seqs=1,
                                              max_context=len(prompt) + n + 8))
    blocks = list(range(cache.num_blocks))
    chunk = Chunk(0, prompt, 0, blocks, True)

    def step():
        nonlocal chunk
        tok = int(st([chunk]).argmax(-1)[0])  # local argmax: enough to keep going
        chunk = Chunk(0, [tok], chunk.start + len(chunk.tokens), blocks, True)
    return step


def _mixed(model, decodes=15, context=100, budget=256):
    """A mixed step as the serving engine runs it: ``decodes`` sequences at ``context`` tokens
    each take one token, a prompt chunk takes the rest of the budget (the same step each call:
    the cache rows are rewritten in place)."""
    from shardwise.serve.kv import Chunk, PagedKVCache
    from shardwise.serve.step import StaticStep, StepOptions
    bs, per = 16, -(-(context + 1) // 16)
    cache = PagedKVCache(model, per * decodes + -(-budget // bs) + 1, bs)
    st = StaticStep(model, cache, StepOptions(compile=False, max_seqs=decodes + 1))
    chunks = [Chunk(i, [1000 + i], context, list(range(i * per, (i + 1) * per)), True)
              for i in range(decodes)]
    first = per * decodes
    chunks.append(Chunk(decodes, list(range(2000, 2000 + budget - decodes)), 0,
                        list(range(first, first + -(-budget // bs))), True))

    def step():
        st(chunks)
    return step


def rank_main(tp: int, dtype: str, mode: str, steps: int, quant: str | None = None,
              model_name: str = "smollm2-135m") -> dict:
    from shardwise.checkpoint.source import build_model, resolve
    from shardwise.mesh import Mesh
    from shardwise.quant.config import QuantConfig
    mesh = Mesh.init(tp=tp)
    model = build_model(resolve(model_name, dense=quant is None), group=mesh.tp_group,
                        dtype=getattr(torch, dtype),
                        quant=QuantConfig(quant) if quant else None).eval()
    prompt = list(range(1000, 1016))
    with torch.inference_mode():
        step = _legacy(model, prompt, steps * 3) if mode == "legacy" else \
            _mixed(model) if mode == "mixed" else \
            _static(model, prompt, steps * 3, mode == "compiled")
        for _ in range(steps):  # prefill + warm-up (and compile)
            step()
        if tp > 1:
            torch.distributed.barrier()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            wall = (time.perf_counter() - t0) * 1e6
    ev = prof.key_averages()
    out = classify(ev, wall, steps)
    out["top"] = [(e.key, round(e.self_cpu_time_total / steps / 1e3, 3), e.count // steps)
                  for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:TOP]]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", default="1,2")
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--mode", default="compiled", choices=("legacy", "eager", "compiled", "mixed"))
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--quant", choices=("int8", "int4"), default=None,
                   help="the GGUF kept quantized (--dtype: the activations)")
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (the real weights) or a preset, e.g. smollm2-135m-even "
                   "(the same matrices, heads that split evenly at tp=2)")
    a = p.parse_args()
    from shardwise.launch import spawn
    print(open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t"),
          f"| {os.cpu_count()} CPUs | load {os.getloadavg()[0]:.2f} | mode {a.mode} | {a.model}")
    print("| tp | dtype | step ms | matmul | other | collectives |")
    print("|---|---|---|---|---|---|")
    for tp in (int(t) for t in a.tp.split(",")):
        for dtype in a.dtype.split(","):
            r = spawn(rank_main, tp, tp, dtype, a.mode, a.steps, a.quant, a.model)[0]
            pct = lambda k: f"{r[k]:.2f} ms ({100 * r[k] / r['step_ms']:.0f}%)"  # noqa: E731
            print(f"| {tp} | {dtype} | {r['step_ms']:.2f} | {pct('matmul_ms')} | "
                  f"{pct('other_ms')} | {pct('collectives_ms')} |", flush=True)
            print("  top self time (ms/step, calls/step):", r["top"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
