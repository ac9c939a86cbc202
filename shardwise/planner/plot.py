"""The trade-off picture: throughput against memory per GPU for every layout, and the share of time
spent in TP all-reduce by TP degree. matplotlib is imported only inside :func:`plot_candidates`."""
from __future__ import annotations

from .memory import GiB
from .report import tp_share
from .search import Plan


def plot_candidates(p: Plan, path: str) -> str:
    """Write a PNG to ``path`` and return it."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    cap = p.cluster.gpu.memory_gib
    tps = sorted({c.layout.tp for c in p.candidates + p.rejected})
    cmap = plt.get_cmap("viridis", max(2, len(tps)))
    for i, tp in enumerate(tps):
        ok = [c for c in p.candidates if c.layout.tp == tp]
        if ok:
            ax.scatter([c.memory.total / GiB for c in ok], [c.throughput for c in ok], color=cmap(i),
                       label=f"tp={tp}", s=36, zorder=3)
    bad = [c for c in p.rejected if c.memory is not None and c.time is not None]
    if bad:
        ax.scatter([c.memory.total / GiB for c in bad], [c.throughput for c in bad], marker="x",
                   color="0.6", label="rejected", zorder=2)
    for c in p.candidates[:3]:
        ax.annotate(f"{c.layout.tp}x{c.layout.pp}x{c.layout.dp}", (c.memory.total / GiB, c.throughput),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(cap, color="crimson", ls="--", lw=1)
    ax.text(cap, ax.get_ylim()[1], f" {cap:g} GiB", color="crimson", va="top", fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("memory per GPU (GiB, log)")
    ax.set_ylabel("tokens/s" if p.workload == "train" else "output tokens/s")
    ax.set_title("layouts (tp x pp x dp): throughput vs memory")
    ax.legend(fontsize=8)
    # best layout per tp: where the time goes
    best: dict[int, object] = {}
    for c in p.candidates + [c for c in p.rejected if c.time is not None]:
        if c.layout.tp not in best or c.throughput > best[c.layout.tp].throughput:
            best[c.layout.tp] = c
    keys = sorted(best)
    shares = []
    for k in keys:
        shares.append(100 * tp_share(best[k]))
    bx.bar([str(k) for k in keys], shares, color=[cmap(tps.index(k)) for k in keys])
    bx.set_xlabel("tensor-parallel degree (best layout for each)")
    what = "training step" if p.workload == "train" else "decode step"
    bx.set_ylabel(f"% of {what} in TP all-reduce")
    bx.set_title(f"{p.cluster.gpu.name}, {p.cluster.interconnect}")
    fig.suptitle(f"{p.model.name} on {p.cluster.gpus} x {p.cluster.gpu.name} ({p.workload})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
