"""The step plan's broadcast on the CPU: the int64 tensor of ``shardwise/serve/wire.py`` (issue 11)
against the pickled ``broadcast_object_list`` it replaced, on 2 gloo ranks, interleaved.

The plan is a decode step of ``--seqs`` sequences (one token each, ``--blocks`` blocks in each
table) plus one new sampler: what rank 0 sends every step of a busy server. Reported: the median
microseconds per broadcast (encode + send on rank 0, receive + decode on rank 1) of each method
over ``--rounds`` interleaved rounds of ``--iters`` broadcasts, and their ratio.

    /work/wt/cpulock bench python benchmarks/plan_wire.py [--seqs 16] [--blocks 8]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _plan(seqs: int, blocks: int):
    from shardwise.serve.kv import Chunk
    from shardwise.serve.scheduler import SamplerSpec, StepPlan
    return StepPlan(chunks=[Chunk(100 + i, [1000 + i], 200 + i, list(range(i * blocks,
                                                                          (i + 1) * blocks)), True)
                            for i in range(seqs)], new={7: SamplerSpec(0.7, 40, 0.9, 123)})


def _pickled(plan, group):
    box = [plan]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def measure(seqs: int, blocks: int, iters: int, rounds: int) -> dict:
    """Worker (both ranks): per-broadcast microseconds of each method, by round."""
    from shardwise.serve import wire
    rank, group, cpu = dist.get_rank(), dist.group.WORLD, torch.device("cpu")
    plan = _plan(seqs, blocks)
    methods = {"tensor": lambda: wire.broadcast(plan if rank == 0 else None, group, cpu),
               "pickle": lambda: _pickled(plan if rank == 0 else None, group)}
    assert methods["tensor"]() == plan and methods["pickle"]() == plan
    out = {m: [] for m in methods}
    for _ in range(rounds):
        for name, fn in methods.items():  # interleaved: A B A B
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            out[name].append(1e6 * (time.perf_counter() - t0) / iters)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    from shardwise.launch import WorkerPool
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    with WorkerPool(2, threads=1) as pool:
        res = pool.run(measure, args.seqs, args.blocks, args.iters, args.rounds)[0]
    med = {k: statistics.median(v) for k, v in res.items()}
    print(json.dumps({"cpu": cpu, "loadavg": os.getloadavg(), "seqs": args.seqs,
                      "blocks": args.blocks, "us_per_broadcast": {k: round(v, 1)
                                                                  for k, v in med.items()},
                      "tensor_over_pickle": round(med["tensor"] / med["pickle"], 3),
                      "rounds": {k: [round(x, 1) for x in v] for k, v in res.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
