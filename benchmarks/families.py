"""What each family's architecture features cost: collectives, memory, attention time.

Three measurements on small random models (CPU, fp32), printed as tables and saved as JSON:

1. **Collectives** per family at tp=2 (two local gloo ranks, ``WorkerPool``): the ledger's counts
   of one forward and one backward of a (1, 64)-token batch, and the elements ``finalize_grads``
   reduces after backward (its one all-reduce: replicated KV-head rows, q/k-norm weights, norm
   weights under sequence parallelism). Parameter bytes per rank.
2. **Soft-capped attention** (Gemma 2) against SDPA for one layer's prefill: median time of
   interleaved repeats and the peak memory above the inputs (VmHWM after a reset of
   /proc/self/clear_refs), at s = 1024 and 2048 keys, 8 heads of 64.
3. **Paged KV blocks** one sequence holds after a 64-token prompt and 448 generated tokens, with a
   64-token window on every layer (Mistral-like: out-of-window blocks freed) and without.

    PYTHONPATH=. .venv/bin/python benchmarks/families.py [--json benchmarks/families.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

FAMILIES = {  # model_type: extra LlamaConfig fields switching the family's features on
    "llama": {},
    "qwen3": dict(),
    "gemma2": dict(hidden_act="gelu_pytorch_tanh", sliding_window=16,
                   layer_types=("sliding_attention", "full_attention"), query_pre_attn_scalar=16,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(hidden_act="gelu_pytorch_tanh", sliding_window=16,
                        layer_types=("sliding_attention", "full_attention"),
                        rope_local_theta=10000.0, query_pre_attn_scalar=16),
    "phi3": dict(partial_rotary_factor=0.5, sliding_window=16),
    "mistral": dict(sliding_window=16),
}


def _config(model_type: str, **kw):
    from shardwise.models.config import LlamaConfig
    base = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=4096, model_type=model_type)
    return LlamaConfig(**{**base, **FAMILIES.get(model_type, {}), **kw})


def collectives_worker(model_type: str, sp: bool) -> dict | None:
    from shardwise.comm import Ledger
    from shardwise.layers import finalize_grads
    from shardwise.mesh import subgroup
    from shardwise.models.llama import LlamaForCausalLM
    from shardwise.shards import init_weights
    group = subgroup([0, 1])
    model = LlamaForCausalLM(_config(model_type), group=group, sequence_parallel=sp)
    init_weights(model, seed=0)
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    with Ledger() as fwd:
        out = model(ids)
    with Ledger() as bwd:
        out.float().pow(2).mean().backward()
    reduced = finalize_grads(model, group)
    if torch.distributed.get_rank() != 0:
        return None
    return {"forward": fwd.counts(), "backward": bwd.counts(), "finalize_elements": reduced,
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def attention_cost(s: int, repeats: int = 5) -> dict:
    from shardwise.models.attention import AttnParams, attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, s, 64, generator=g) for _ in range(3))
    out = {}
    times: dict[str, list[float]] = {"sdpa": [], "softcap": []}
    params = {"sdpa": AttnParams(scale=64 ** -0.5),
              "softcap": AttnParams(scale=64 ** -0.5, softcap=50.0)}
    for _ in range(repeats):  # interleaved: A B A B
        for name, p in params.items():
            t0 = time.perf_counter()
            attention(q, k, v, p, causal=True)
            times[name].append(time.perf_counter() - t0)
    for name, p in params.items():
        out[name] = {"median_s": statistics.median(times[name]), "peak_mib": _peak(q, k, v, p)}
    out["scores_mib"] = 8 * s * s * 4 / 2**20
    return out


def _peak(q, k, v, params) -> float:
    """Peak RSS above the current one while ``attention`` runs (MiB)."""
    from shardwise.models.attention import attention
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status("VmRSS")
    attention(q, k, v, params, causal=True)
    return (_status("VmHWM") - base) / 2**20


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def blocks_held(window: int | None, prompt: int = 64, new: int = 448, block: int = 16) -> dict:
    from shardwise.models.llama import LlamaForCausalLM
    from shardwise.serve.engine import Runner
    from shardwise.serve.kv import FREED, PagedKVCache
    from shardwise.serve.scheduler import SamplerSpec, Scheduler, Sequence
    from shardwise.shards import init_weights
    model = LlamaForCausalLM(_config("mistral", sliding_window=window)).eval()
    init_weights(model, seed=0)
    blocks = 64
    cache = PagedKVCache(model, blocks, block)
    runner = Runner(model, None, cache)
    sched = Scheduler(blocks, block, max_batched_tokens=64, window=cache.window)
    seq = Sequence(0, list(range(1, prompt + 1)), SamplerSpec(), new)
    sched.add(seq)
    held = 0
    with torch.inference_mode():
        while sched.has_work():
            plan = sched.schedule()
            held = max(held, sum(b != FREED for b in seq.blocks))
            sched.update(plan, runner.execute(plan).sampled)
    kv_per_block = cache.bytes // blocks
    return {"window": window, "tokens": prompt + new, "max_blocks_held": held,
            "max_kv_mib": held * kv_per_block / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from shardwise.bench import cpu_model
    from shardwise.launch import WorkerPool
    torch.set_num_threads(1)
    res: dict = {"cpu": cpu_model(), "loadavg_start": os.getloadavg()}
    print(f"CPU: {res['cpu']}, load average {res['loadavg_start']}")
    with WorkerPool(2, threads=1) as pool:
        res["collectives"] = {f"{mt}{' +SP' if sp else ''}": pool.run(collectives_worker, mt, sp)[0]
                              for mt in FAMILIES for sp in (False, True)}
    print("\n| family (tp=2) | forward | backward | finalize_grads elements | params/rank KiB |")
    print("|---|---|---|---|---|")
    for name, r in res["collectives"].items():
        print(f"| {name} | {r['forward']} | {r['backward']} | {r['finalize_elements']} | "
              f"{r['param_bytes'] / 1024:.0f} |")
    res["attention"] = {s: attention_cost(s) for s in (1024, 2048)}
    print("\n| keys | SDPA ms | soft-cap ms | ratio | SDPA peak MiB | soft-cap peak MiB |"
          " one score matrix MiB |")
    print("|---|---|---|---|---|---|---|")
    for s, r in res["attention"].items():
        a, b = r["sdpa"], r["softcap"]
        print(f"| {s} | {a['median_s'] * 1e3:.1f} | {b['median_s'] * 1e3:.1f} | "
              f"{b['median_s'] / a['median_s']:.2f} | {max(0.0, a['peak_mib']):.0f} | "
              f"{max(0.0, b['peak_mib']):.0f} | {r['scores_mib']:.0f} |")
    res["paged"] = [blocks_held(w) for w in (None, 64)]
    print("\n| window | tokens | most blocks held (16 tokens each) | KV MiB per rank |")
    print("|---|---|---|---|")
    for r in res["paged"]:
        print(f"| {r['window']} | {r['tokens']} | {r['max_blocks_held']} | {r['max_kv_mib']:.2f} |")
    res["loadavg_end"] = os.getloadavg()
    print(f"\nload average at end {res['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
