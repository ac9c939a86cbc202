"""``shardwise bench comm``: latency and bus bandwidth of the TP collectives against message size.

Every rank of a local group runs all-reduce, all-gather and reduce-scatter for message sizes
``S`` from a few bytes to tens of MiB and reports, as nccl-tests does,

    latency   = mean wall time of one collective (max over ranks)
    algbw     = S / latency
    busbw     = algbw x 2(n-1)/n (all-reduce) or x (n-1)/n (all-gather, reduce-scatter)

with ``S`` the full buffer (for all-gather and reduce-scatter, n x the per-rank shard). Rows are
written in the calibration schema of :mod:`shardwise.planner.calibration`, so that
``shardwise plan --calibration FILE`` can use the measured link instead of the catalog's.

``backend="auto"`` goes through :mod:`shardwise.comm`'s helpers, i.e. whatever path the library's
own layers take (the shared-memory backend on one host when available, else gloo / NCCL);
``backend="dist"`` calls ``torch.distributed`` directly (gloo over TCP loopback on CPU);
``backend="native"`` is ``auto`` with the native kernels loaded first, so that shared-memory
all-reduces run as the C++ operator (``shardwise::shm_all_reduce``), the inference engines' path
(training's layers take ``auto``'s).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import cpu_model
from ..planner.calibration import OPS, parse, result_row

DEFAULT_SIZES = tuple(4 << (2 * i) for i in range(13))  # 4 B, 16 B, ..., 64 MiB (x4 steps)


def device_description(n: int) -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x {n}"
    return f"CPU {cpu_model()}, {os.cpu_count()} cores, {n} local ranks"


def _op_fn(op: str, nbytes: int, n: int, group, backend: str,
           dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], Any], int]:
    """A closure running one collective, and the message size S it really moves (rounded so that
    every rank's shard holds a whole number of elements)."""
    from .. import comm
    esize = torch.empty((), dtype=dtype).element_size()
    if op == "all_reduce":
        count = max(1, nbytes // esize)
        x = torch.ones(count, dtype=dtype, device=device)
        if backend == "dist":
            return (lambda: dist.all_reduce(x, group=group)), count * esize
        return (lambda: comm.all_reduce_(x, group)), count * esize
    shard = max(1, nbytes // esize // n)
    full = torch.ones(shard * n, dtype=dtype, device=device)
    part = torch.ones(shard, dtype=dtype, device=device)
    # torch 2.13 names them *_single; older releases *_tensor
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    if op == "all_gather":
        if backend == "dist":
            return (lambda: gather(full, part, group=group)), shard * n * esize
        return (lambda: comm.gather_stacked(part, group, n)), shard * n * esize
    if op == "reduce_scatter":
        if backend == "dist":
            return (lambda: scatter(part, full, group=group)), shard * n * esize
        return (lambda: comm.reduce_scatter_dim(full, group, 0)), shard * n * esize
    raise ValueError(f"unknown collective {op!r}: expected one of {', '.join(OPS)}")


def _time(fn: Callable[[], Any], group, device: torch.device, *, iters: int, warmup: int,
          budget_s: float) -> float:
    """Mean seconds per call, max over ranks; the iteration count is agreed by all ranks."""
    for _ in range(warmup):
        fn()
    dist.barrier(group=group)
    start = time.perf_counter()
    fn()
    one = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(one, op=dist.ReduceOp.MAX, group=group)
    n_iter = int(max(3, min(iters, budget_s / max(float(one), 1e-7))))
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(n_iter):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    mean = torch.tensor([(time.perf_counter() - start) / n_iter], dtype=torch.float64)
    dist.all_reduce(mean, op=dist.ReduceOp.MAX, group=group)
    return float(mean)


def measure_rank(sizes: tuple[int, ...] = DEFAULT_SIZES, ops: tuple[str, ...] = OPS, *,
                 backend: str = "auto", iters: int = 50, warmup: int = 3,
                 budget_s: float = 0.5, dtype: str = "float32") -> dict[str, Any]:
    """Worker body: measure every (op, size) on the world's group. Returns the calibration
    object (the same on every rank)."""
    from .. import comm
    from ..mesh import Mesh
    if backend not in ("auto", "dist", "native"):
        raise ValueError(f"backend={backend!r}: use 'auto' (shardwise.comm's path), 'native' "
                         "(its C++ all-reduce) or 'dist'")
    from ..mesh import launch_env
    n = launch_env().world
    if n < 2:
        raise ValueError(f"bench comm needs >= 2 ranks, got {n}")
    mesh = Mesh.init(tp=n) if not dist.is_initialized() else None
    group = mesh.tp_group if mesh else dist.group.WORLD
    device = mesh.device if mesh else torch.device("cpu")
    if backend == "native":
        from .. import kernels
        if not kernels.load():
            raise RuntimeError(f"--backend native: {kernels.status()}")
        comm.prepare(group)
    rows = []
    for op in ops:
        for size in sizes:
            fn, real = _op_fn(op, size, n, group, backend, getattr(torch, dtype), device)
            seconds = _time(fn, group, device, iters=iters, warmup=warmup, budget_s=budget_s)
            rows.append(result_row(op, real, seconds, n))
    name = dist.get_backend(group) if backend == "dist" else comm.backend_name(group)
    if backend == "native" and comm.native_all_reduce(group):
        name += " (all-reduce in C++)"
    return {"device": device_description(n), "world_size": n, "backend": name,
            "results": rows, "meta": {"dtype": dtype, "torch": torch.__version__,
                                      "threads_per_rank": torch.get_num_threads(),
                                      "path": backend}}


def bench_comm(nprocs: int = 2, sizes: tuple[int, ...] = DEFAULT_SIZES,
               ops: tuple[str, ...] = OPS, *, backend: str = "auto", iters: int = 50,
               warmup: int = 3, budget_s: float = 0.5, dtype: str = "float32") -> dict[str, Any]:
    """Spawn ``nprocs`` local ranks and measure; the result validates against the calibration
    schema (``shardwise.planner.calibration.parse``)."""
    if nprocs < 2:
        raise ValueError(f"--nprocs {nprocs}: collectives need at least 2 ranks")
    if not sizes or min(sizes) < 1:
        raise ValueError(f"message sizes must be >= 1 byte, got {list(sizes)}")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"unknown collective(s) {unknown}: expected {', '.join(OPS)}")
    from ..launch import spawn
    result = spawn(measure_rank, nprocs, tuple(sizes), tuple(ops), backend=backend, iters=iters,
                   warmup=warmup, budget_s=budget_s, dtype=dtype)[0]
    parse(result, "bench comm result")
    return result


def format_bytes(n: int) -> str:
    for unit, k in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:g} {unit}"
    return f"{n} B"


def format_table(result: dict[str, Any]) -> str:
    """Rows: size; columns: latency (us) and busbw (GB/s) of each op."""
    ops = [op for op in OPS if any(r["op"] == op for r in result["results"])]
    by = {(r["op"], r["bytes"]): r for r in result["results"]}
    sizes = sorted({r["bytes"] for r in result["results"]})
    head = f"{'size':>10}" + "".join(f" {op + ' us':>18} {'GB/s':>7}" for op in ops)
    lines = [f"{result['device']}, backend {result['backend']}", head]
    for s in sizes:
        cells = ""
        for op in ops:
            r = by.get((op, s))
            cells += f" {r['latency_s'] * 1e6:>18.1f} {r['busbw_GBps']:>7.3f}" if r \
                else f" {'-':>18} {'-':>7}"
        lines.append(f"{format_bytes(s):>10}{cells}")
    return "\n".join(lines)
