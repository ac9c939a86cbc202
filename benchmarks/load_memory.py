"""Peak memory per rank while loading SmolLM2-135M at tp = 1, 2, 3 (each rank reads its slice).

Goal (issue 3): each rank's peak resident memory while loading is under
``1/t x full fp32 weights + process baseline + 20%``. With ``--quant int4|int8`` (issue 16) the
model is read from the GGUF kept quantized, and the goal is ``file size / t + 20%`` over the
baseline (taken after loading the first layer the same way and freeing it: the code pages a
quantized load touches belong to the process). A sampler thread reads /proc/self/status every 2 ms: RssAnon (memory the process
owns), RssFile (file pages mapped, here the memory-mapped safetensors pages that were touched;
the kernel can drop them at any time) and VmHWM (peak RSS).

    .venv/bin/python benchmarks/load_memory.py [--tp 1 2 3] [--json out.json]
    .venv/bin/python benchmarks/load_memory.py --quant int4 --dtype bfloat16 --tp 1 2 3
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


def measure(tp: int, quant: str | None = None, dtype: str = "float32") -> dict:
    import torch

    from shardwise import Mesh
    from shardwise.checkpoint.source import build_model, resolve
    from shardwise.quant.config import QuantConfig
    from shardwise.quant.load import release_free_memory, weight_bytes
    mesh = Mesh.init(tp=tp)
    source = resolve("smollm2-135m", dense=quant is None)
    if quant:  # the process baseline includes the code a quantized load runs (library pages):
        # load the first layer (and the embedding) the same way once, and let it go
        import gc
        warm = build_model(source, group=mesh.tp_group, dtype=getattr(torch, dtype),
                           quant=QuantConfig(quant), layers=range(1))
        del warm
        gc.collect()
        release_free_memory()
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
    model = build_model(source, group=mesh.tp_group, dtype=getattr(torch, dtype),
                        quant=QuantConfig(quant) if quant else None)
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    for k, v in _status().items():
        peak[k] = max(peak[k], v)
    params = weight_bytes(model)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return {"tp": tp, "rank": mesh.rank, "load_s": round(seconds, 2), "param_bytes": params,
            "base": base, "peak": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--json")
    ap.add_argument("--quant", choices=["int8", "int4"], help="read the GGUF kept quantized")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    from shardwise.checkpoint.gguf import find_smollm2_gguf
    from shardwise.checkpoint.source import resolve
    from shardwise.launch import spawn
    cfg = resolve("smollm2-135m", dense=args.quant is None).config
    full = find_smollm2_gguf().stat().st_size if args.quant else cfg.num_parameters() * 4
    mib = 2 ** 20
    rows = []
    what = f"GGUF file ({args.quant}, {args.dtype})" if args.quant else "fp32 weights"
    print(f"SmolLM2-135M {what}: {full / mib:.0f} MiB")
    print("tp rank  load_s  params MiB  anon+ MiB  peak RSS+ MiB  (file pages)  goal MiB  ok")
    for tp in args.tp:
        for r in spawn(measure, tp, tp, args.quant, args.dtype):
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
