"""Peak memory per rank while loading SmolLM2-135M at tp = 1, 2, 3 (each rank reads its slice).

Goal (issue 3): each rank's peak resident memory while loading is under
``1/t x full fp32 weights + process baseline + 20%``. A sampler thread reads /proc/self/status
every 2 ms: RssAnon (memory the process owns), RssFile (file pages mapped, here the memory-mapped
safetensors pages that were touched; the kernel can drop them at any time) and VmHWM (peak RSS).

    .venv/bin/python benchmarks/load_memory.py [--tp 1 2 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import threading
import time


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


def measure(tp: int) -> dict:
    import torch

    from shardwise import Mesh
    from shardwise.checkpoint.source import build_model, resolve
    mesh = Mesh.init(tp=tp)
    source = resolve("smollm2-135m")
    base = _status()
    peak = dict(base)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for k, v in _status().items():
                peak[k] = max(peak[k], v)
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    model = build_model(source, group=mesh.tp_group)
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    for k, v in _status().items():
        peak[k] = max(peak[k], v)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return {"tp": tp, "rank": mesh.rank, "load_s": round(seconds, 2), "param_bytes": params,
            "base": base, "peak": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--json")
    args = ap.parse_args()
    from shardwise.checkpoint.source import resolve
    from shardwise.launch import spawn
    cfg = resolve("smollm2-135m").config
    full = cfg.num_parameters() * 4
    mib = 2 ** 20
    rows = []
    print(f"SmolLM2-135M fp32 weights: {full / mib:.0f} MiB")
    print("tp rank  load_s  params MiB  anon+ MiB  peak RSS+ MiB  (file pages)  goal MiB  ok")
    for tp in args.tp:
        for r in spawn(measure, tp, tp):
            anon = (r["peak"]["RssAnon"] - r["base"]["RssAnon"]) / mib
            rss = (r["peak"]["VmHWM"] - r["base"]["VmRSS"]) / mib
            filep = (r["peak"]["RssFile"] - r["base"]["RssFile"]) / mib
            goal = full / tp / mib * 1.2
            ok = rss <= goal  # peak resident growth (VmHWM - RSS before loading)
            r.update(anon_growth_mib=round(anon, 1), rss_growth_mib=round(rss, 1),
                     file_growth_mib=round(filep, 1), goal_mib=round(goal, 1), ok=ok)
            rows.append(r)
            print(f"{tp:2d} {r['rank']:4d}  {r['load_s']:6.2f}  {r['param_bytes'] / mib:10.1f}  "
                  f"{anon:9.1f}  {rss:13.1f}  {filep:12.1f}  {goal:8.1f}  {'yes' if ok else 'NO'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
