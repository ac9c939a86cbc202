"""Ranks pinned to cores: each local rank gets its own cores and as many torch threads.

Tensor-parallel ranks on one host split its cores: rank r of n gets a disjoint set, pinned with
``os.sched_setaffinity``, and ``torch.set_num_threads(len(cores))``. Unpinned, the kernel moves
threads between cores and a rank's OpenMP team can land on a core its neighbour is using: every
collective then waits for whichever rank was descheduled.

On a host with several NUMA nodes (``/sys/devices/system/node/node*/cpulist``) ranks are spread
over the nodes, one rank per node when there are as many nodes as ranks, and a rank's cores stay
within its node. A pinned process's pages are allocated on the node it runs on (Linux's default
first-touch policy), so pinning before the model is loaded puts each rank's weights in its own
node's memory. When there are more ranks than cores, ranks share cores (round robin) and
:func:`plan` says so in its note, once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

NODE_ROOT = "/sys/devices/system/node"


def parse_cpulist(text: str) -> list[int]:
    """``"0-3,8,10-11"`` -> ``[0, 1, 2, 3, 8, 10, 11]`` (the kernel's cpulist format)."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def read_nodes(root: str | Path = NODE_ROOT, allowed: set[int] | None = None) -> list[list[int]]:
    """The CPUs of each NUMA node this process may use, nodes without such CPUs dropped; one
    node of every allowed CPU when the topology cannot be read."""
    allowed = set(os.sched_getaffinity(0)) if allowed is None else set(allowed)
    nodes = []
    for d in sorted(Path(root).glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            cpus = [c for c in parse_cpulist((d / "cpulist").read_text()) if c in allowed]
        except (OSError, ValueError):
            continue
        if cpus:
            nodes.append(cpus)
    return nodes or [sorted(allowed)]


@dataclass(frozen=True)
class Placement:
    cores: list[list[int]]   # local rank -> its cores
    nodes: list[int]         # local rank -> its NUMA node
    note: str | None         # set when ranks have to share cores


def plan(nranks: int, nodes: list[list[int]]) -> Placement:
    """Cores for each of ``nranks`` local ranks: ranks spread evenly over the nodes (ranks
    ``0..k-1`` on node 0, and so on: tensor-parallel neighbours stay together), each node's cores
    split into contiguous, disjoint groups; ranks share cores only when there are fewer cores
    than ranks."""
    if nranks < 1:
        raise ValueError(f"nranks={nranks} must be >= 1")
    total = sum(len(n) for n in nodes)
    if nranks > total:
        flat = [c for n in nodes for c in n]
        node_of = {c: i for i, n in enumerate(nodes) for c in n}
        cores = [[flat[r % total]] for r in range(nranks)]
        shared = ", ".join(f"rank {r} on core {c[0]}" for r, c in enumerate(cores) if r >= total)
        note = (f"{nranks} ranks on {total} cores: ranks share cores ({shared}); each collective "
                "waits for whichever rank the scheduler parked")
        return Placement(cores, [node_of[c[0]] for c in cores], note)
    # ranks per node in proportion to its cores, at least one core per rank
    per_node = [nranks * len(n) // total for n in nodes]
    for i in sorted(range(len(nodes)), key=lambda i: -len(nodes[i]))[: nranks - sum(per_node)]:
        per_node[i] += 1
    cores, node_ids = [], []
    for i, (cpus, k) in enumerate(zip(nodes, per_node)):
        while k > len(cpus):  # more ranks than this node's cores: hand one to another node
            k -= 1
        for j in range(k):
            cores.append(cpus[j * len(cpus) // k:(j + 1) * len(cpus) // k])
            node_ids.append(i)
    while len(cores) < nranks:  # rounding left ranks over: split the largest groups
        big = max(range(len(cores)), key=lambda r: len(cores[r]))
        half = len(cores[big]) // 2
        cores.insert(big + 1, cores[big][half:])
        node_ids.insert(big + 1, node_ids[big])
        cores[big] = cores[big][:half]
    return Placement(cores, node_ids, None)


def pin(local_rank: int, local_world: int, *, root: str | Path = NODE_ROOT) -> list[int]:
    """Pin this process to its cores and set torch's threads to their number; returns them."""
    import torch
    cores = plan(local_world, read_nodes(root)).cores[local_rank]
    try:
        os.sched_setaffinity(0, cores)
    except OSError:  # not permitted here (a container's cgroup): threads still match
        pass
    torch.set_num_threads(len(cores))
    return cores
