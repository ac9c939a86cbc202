"""Load time of one rank's slice: whole-row block reads (the library) vs one read per row.

A tensor split along its second dimension (o_proj, down_proj) is strided in a safetensors file.
The library reads whole rows in blocks of at most 4 MiB and keeps 1/t of each (reading the whole
tensor); the alternative reads only the kept bytes of each row, one ``preadv`` per row. This
script loads rank r's slice of SmolLM2-135M (fp32) at tp=3 both ways, interleaved (A B A B), with
the page cache warm and after evicting the file from it (``posix_fadvise(DONTNEED)``), and
reports medians, bytes read and bytes kept.

    /work/wt/cpulock bench python benchmarks/load_strided.py --repeats 5
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from shardwise.bench import cpu_model
from shardwise.checkpoint import hf
from shardwise.checkpoint.source import resolve
from shardwise.mesh import LayoutOnly
from shardwise.models.llama import LlamaForCausalLM
from shardwise.shards import assemble_local, sharded_params


class RowReader(hf.SafetensorsReader):
    """Reads only the kept bytes of each row of a strided slice: one positioned read per row."""

    def _strided(self, fd, begin, have, dim, start, stop, dtype, es):
        outer = math.prod(have[:dim])
        inner = math.prod(have[dim + 1:]) * es
        rows = stop - start
        out = torch.empty(have[:dim] + (rows,) + have[dim + 1:], dtype=dtype)
        flat = out.view(outer, -1).view(torch.uint8).numpy()  # (outer, rows x inner bytes)
        per = have[dim] * inner
        for o in range(outer):
            offset = begin + o * per + start * inner
            if os.preadv(fd, [memoryview(flat[o])], offset) != rows * inner:
                raise OSError("short read")
            self.bytes_read += rows * inner
        return out


@torch.no_grad()
def load(model, directory: Path, reader_cls) -> tuple[float, int, int]:
    reader = reader_cls(directory)
    t0 = time.perf_counter()
    for path, p, _ in sharded_params(model):
        p.copy_(assemble_local(path, p, reader.read))
    seconds = time.perf_counter() - t0
    reader.close()
    return seconds, reader.bytes_read, reader.bytes_kept


def evict(directory: Path) -> None:
    for f in directory.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/load_strided.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    source = resolve("smollm2-135m")
    model = LlamaForCausalLM(source.config, group=LayoutOnly(args.tp, args.rank))
    total = sum(f.stat().st_size for f in source.weights.glob("*.safetensors"))
    print(f"CPU: {cpu_model()}; load average {os.getloadavg()[0]:.2f}; "
          f"file {total / 2**20:.0f} MiB; tp={args.tp} rank {args.rank}")
    times: dict[str, list[float]] = {}
    counts: dict[str, tuple[int, int]] = {}
    for _ in range(args.repeats):
        for cache in ("warm", "cold"):
            for name, cls in (("blocks", hf.SafetensorsReader), ("rows", RowReader)):
                if cache == "cold":
                    evict(source.weights)
                else:
                    load(model, source.weights, cls)  # warm the page cache
                s, read, kept = load(model, source.weights, cls)
                times.setdefault(f"{name}-{cache}", []).append(s)
                counts[name] = (read, kept)
    res = {"cpu": cpu_model(), "load_average": os.getloadavg()[0], "file_bytes": total,
           "tp": args.tp, "rank": args.rank, "repeats": args.repeats}
    for key, ts in times.items():
        res[f"{key}_median_s"] = round(statistics.median(ts), 4)
    for name, (read, kept) in counts.items():
        res[f"{name}_bytes_read"], res[f"{name}_bytes_kept"] = read, kept
        print(f"{name}: reads {read / 2**20:.1f} MiB ({read / total:.1%} of the file), "
              f"keeps {kept / 2**20:.1f} MiB ({kept / total:.1%})")
    for cache in ("warm", "cold"):
        a, b = res[f"blocks-{cache}_median_s"], res[f"rows-{cache}_median_s"]
        print(f"{cache} cache: blocks {a:.3f} s, rows {b:.3f} s, rows / blocks = {b / a:.2f}")
    res["load_average_after"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
