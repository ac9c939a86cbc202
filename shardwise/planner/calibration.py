"""Measured collective figures: the JSON schema that ``shardwise bench comm`` writes and
``shardwise plan --calibration FILE`` reads.

Schema (one JSON object)::

    {
      "device": "NVIDIA A100-SXM4-80GB",     # free text, what was measured
      "world_size": 8,                       # ranks in the measured group (>= 2)
      "backend": "nccl",                     # "nccl" | "gloo" | ...
      "results": [                           # one row per (op, message size)
        {"op": "all_reduce",                 # "all_reduce" | "all_gather" | "reduce_scatter"
         "bytes": 16777216,                  # message size, nccl-tests convention (below)
         "latency_s": 0.000118,              # time of one collective, seconds
         "algbw_GBps": 142.2,                # bytes / latency_s / 1e9
         "busbw_GBps": 248.8},               # busbw(op, bytes, latency_s, world_size)
        ...
      ]
    }

Message size follows nccl-tests: for all-reduce the buffer every rank holds; for all-gather and
reduce-scatter the full (gathered) buffer, i.e. world_size x the per-rank shard.

Bus bandwidth (nccl-tests, doc/PERFORMANCE.md): algbw = bytes / time, and

    all_reduce       busbw = algbw x 2 (n-1) / n
    all_gather       busbw = algbw x (n-1) / n
    reduce_scatter   busbw = algbw x (n-1) / n

so busbw is comparable with the per-direction link rate whatever n is.

The planner reduces a file to one intra-node :class:`~shardwise.planner.gpus.Link`: latency alpha =
the smallest all-reduce latency measured (small messages are latency-bound) and bandwidth = the
largest all-reduce busbw (large messages are bandwidth-bound). It replaces the catalog's intra-node
link for every group that stays inside a node.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .gpus import Link

OPS = ("all_reduce", "all_gather", "reduce_scatter")
_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n,
           "all_gather": lambda n: (n - 1) / n,
           "reduce_scatter": lambda n: (n - 1) / n}


def busbw(op: str, nbytes: int, seconds: float, n: int) -> float:
    """nccl-tests' bus bandwidth in GB/s (1e9 bytes/s) of one collective over ``n`` ranks."""
    if op not in _FACTOR:
        raise ValueError(f"unknown collective {op!r}: expected one of {', '.join(OPS)}")
    if seconds <= 0 or n < 1 or nbytes < 0:
        raise ValueError(f"busbw needs seconds > 0, n >= 1, bytes >= 0 (got {seconds}, {n}, {nbytes})")
    return nbytes / seconds / 1e9 * _FACTOR[op](n)


@dataclass(frozen=True)
class Calibration:
    device: str
    world_size: int
    backend: str
    results: tuple[dict, ...]

    def link(self) -> Link:
        """One intra-node link from the all-reduce rows (alpha = min latency, bw = max busbw)."""
        rows = [r for r in self.results if r["op"] == "all_reduce"] or list(self.results)
        alpha = min(r["latency_s"] for r in rows)
        bw = max(r["busbw_GBps"] for r in rows)
        return Link("measured", alpha, bw, bw)

    def describe(self) -> str:
        return (f"{self.device} ({self.backend}, {self.world_size} ranks, {len(self.results)} "
                f"measurements): {self.link().describe()}")


def parse(obj: object, where: str = "calibration") -> Calibration:
    """Validate a decoded JSON object against the schema; ValueError names the offending field."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("device", "world_size", "backend", "results") if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    n = obj["world_size"]
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"{where}: world_size must be an integer >= 2, got {n!r}")
    rows = obj["results"]
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{where}: results must be a non-empty list")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{where}: results[{i}] is not an object")
        if r.get("op") not in OPS:
            raise ValueError(f"{where}: results[{i}].op={r.get('op')!r}, expected one of {', '.join(OPS)}")
        for k in ("bytes", "latency_s", "algbw_GBps", "busbw_GBps"):
            if not isinstance(r.get(k), (int, float)) or r[k] < 0:
                raise ValueError(f"{where}: results[{i}].{k} must be a number >= 0, got {r.get(k)!r}")
        if r["latency_s"] <= 0:
            raise ValueError(f"{where}: results[{i}].latency_s must be > 0, got {r['latency_s']}")
    return Calibration(str(obj["device"]), n, str(obj["backend"]), tuple(rows))


def load(path: str) -> Calibration:
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read calibration file {path!r}: {e}") from e
    return parse(obj, path)


def result_row(op: str, nbytes: int, seconds: float, n: int) -> dict:
    """One ``results`` row, for writers of calibration files (e.g. ``shardwise bench comm``)."""
    return {"op": op, "bytes": int(nbytes), "latency_s": seconds,
            "algbw_GBps": nbytes / seconds / 1e9, "busbw_GBps": busbw(op, nbytes, seconds, n)}
