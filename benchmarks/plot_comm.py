"""Plot `shardwise bench comm --json` files: latency and bus bandwidth against message size.

    python benchmarks/plot_comm.py benchmarks/comm_2ranks_shm.json benchmarks/comm_2ranks_gloo.json \
        --out benchmarks/comm_2ranks.png
"""
from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (lat, bw) = plt.subplots(1, 2, figsize=(11, 4))
    for path in args.files:
        data = json.load(open(path))
        label = data.get("backend", path)
        for op, style in (("all_reduce", "-o"), ("all_gather", "--s"), ("reduce_scatter", ":^")):
            rows = sorted((r for r in data["results"] if r["op"] == op), key=lambda r: r["bytes"])
            if not rows:
                continue
            x = [r["bytes"] for r in rows]
            lat.plot(x, [r["latency_s"] * 1e6 for r in rows], style, label=f"{label} {op}", ms=3)
            bw.plot(x, [r["busbw_GBps"] for r in rows], style, label=f"{label} {op}", ms=3)
    for ax, ylabel in ((lat, "latency (us)"), (bw, "bus bandwidth (GB/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    lat.set_yscale("log")
    bw.legend(fontsize=7)
    fig.suptitle(f"{data.get('world_size', '?')} ranks on one CPU host: shared memory vs gloo")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
