"""The two small native operators of the decode step against the paths they replaced.

    python benchmarks/native_ops.py [--calls 1000]

* all-reduce, 2 ranks (one pinned process each), bf16 messages of 1-256 rows of 576: the Python
  operator ``shardwise::all_reduce`` with the group's sums in Python, ``ShmCommunicator`` alone,
  and ``shardwise::shm_all_reduce`` (C++); the C++ result is checked bit-equal to the Python one.
* the greedy pick over 49,152 logits (1 and 16 rows, fp32 and bf16): ``double()`` + ``max``
  (``sample`` before), ``torch.max(dim)``, and ``shardwise::row_argmax``.

Microseconds per call, medians of interleaved repeats; the CPU model is printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def _time(fn, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def all_reduce_rank(calls: int) -> dict[str, float]:
    from shardwise import comm, kernels
    from shardwise.mesh import Mesh
    kernels.load()
    group = Mesh.init(tp=2).tp_group
    out: dict[str, float] = {}
    with torch.inference_mode():
        comm.prepare(group)
        shm, key = comm._SHM[group], comm.group_key(group)
        assert shm.native, "the native kernels did not load"
        for rows in (1, 16, 64, 128, 256):
            x = torch.randn(1, rows, 576).to(torch.bfloat16) * (1 + torch.distributed.get_rank())
            native = comm.all_reduce(x, group)
            shm.native = False  # the Python path of the same segment
            assert torch.equal(native, torch.ops.shardwise.all_reduce(x, key)), rows
            paths = {"Python operator": lambda: torch.ops.shardwise.all_reduce(x, key),
                     "ShmCommunicator": lambda: shm.all_reduce(x.clone()),
                     "C++ operator": lambda: torch.ops.shardwise.shm_all_reduce(x, key)}
            runs: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(3):
                for name, fn in paths.items():
                    shm.native = name == "C++ operator"
                    torch.distributed.barrier()
                    runs[name].append(_time(fn, calls))
            shm.native = True
            for name, v in runs.items():
                out[f"{rows}|{name}"] = statistics.median(v)
    return out


def argmax_table(calls: int) -> None:
    from shardwise import kernels
    assert kernels.load(), kernels.status()
    print("\n| logits | double() + max (before) | torch.max(dim) | row_argmax |\n|---|---|---|---|")
    for rows in (1, 16):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, 49152).to(dtype)
            fns = [lambda: x.double().max(-1), lambda: x.max(-1),
                   lambda: torch.ops.shardwise.row_argmax(x)]
            runs: list[list[float]] = [[] for _ in fns]
            for _ in range(7):
                for i, fn in enumerate(fns):
                    runs[i].append(_time(fn, max(20, calls // 5)))
            cells = " | ".join(f"{statistics.median(r):.1f} us" for r in runs)
            print(f"| {rows} x 49152 {str(dtype)[6:]} | {cells} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=1000)
    a = p.parse_args()
    from shardwise.launch import spawn
    print(open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t"),
          f"| {os.cpu_count()} CPUs | load {os.getloadavg()[0]:.2f}")
    res = spawn(all_reduce_rank, 2, a.calls)[0]
    names = ("Python operator", "ShmCommunicator", "C++ operator")
    print("\n| bf16 message | " + " | ".join(names) + " |\n|---|---|---|---|")
    for rows in (1, 16, 64, 128, 256):
        cells = " | ".join(f"{res[f'{rows}|{n}']:.1f} us" for n in names)
        print(f"| {rows} x 576 ({rows * 576 * 2 / 1024:.0f} KiB) | {cells} |")
    argmax_table(a.calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
