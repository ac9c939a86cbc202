"""Run a function on N local processes: the launcher used by tests and the CLI.

Multi-node runs go through ``torchrun`` instead; both set the same environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), which :meth:`shardwise.Mesh.init` reads.

* :func:`spawn` runs ``fn(*args)`` once on each of N fresh processes and returns their results.
* :class:`WorkerPool` keeps N processes (and their process group) alive and runs many tasks on
  them: a test module pays the ~1-3 s start-up of N processes once.

Each worker is pinned to its own cores (:mod:`shardwise.affinity`: disjoint cores per rank, NUMA
aware) and runs as many torch threads as it has cores: two ranks with two threads each on two
cores run several times slower than with one (see REFERENCES.md). A worker that raises or dies
makes the call raise in the parent, naming the rank, instead of hanging.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(nprocs: int) -> int:
    return max(1, (os.cpu_count() or 1) // nprocs)


class WorkerError(RuntimeError):
    """A worker process raised or died."""


def _setup(rank: int, world: int, port: int, threads: int | None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from .affinity import pin
    pin(rank, world)
    if threads:
        torch.set_num_threads(threads)


def _worker(rank: int, world: int, port: int, threads: int | None, init_pg: bool,
            tasks: Any, results: Any) -> None:
    _setup(rank, world, port, threads)
    if init_pg and world > 1:
        import torch.distributed as dist
        from datetime import timedelta
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            results.put((rank, False, traceback.format_exc()))
    try:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


class WorkerPool:
    """N long-lived local processes, each with ``RANK``/``WORLD_SIZE`` set and (by default) the
    gloo process group initialised. ``pool.run(fn, *args)`` calls ``fn(*args)`` on every rank and
    returns the list of results by rank. ``fn`` must be importable (a module-level function)."""

    def __init__(self, nprocs: int, *, threads: int | None = None, init_process_group: bool = True,
                 timeout_s: float = 300.0) -> None:
        ctx = mp.get_context("spawn")
        self.nprocs, self.timeout_s = nprocs, timeout_s
        port = free_port()
        self._tasks = [ctx.Queue() for _ in range(nprocs)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, daemon=True,
                                   args=(r, nprocs, port, threads, init_process_group,
                                         self._tasks[r], self._results))
                       for r in range(nprocs)]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None,
            **kwargs: Any) -> list[Any]:
        for q in self._tasks:
            q.put((fn, args, kwargs))
        return self._collect(timeout_s or self.timeout_s)

    def _collect(self, timeout_s: float) -> list[Any]:
        import time
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(out) < self.nprocs:
            try:
                rank, ok, value = self._results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in out]
                if dead:
                    self.close(force=True)
                    codes = {r: self._procs[r].exitcode for r in dead}
                    raise WorkerError(f"worker rank(s) {dead} died (exit codes {codes})") from None
                if time.monotonic() > deadline:
                    self.close(force=True)
                    raise WorkerError(f"workers timed out after {timeout_s:.0f} s; "
                                      f"results from ranks {sorted(out)} only") from None
                continue
            if not ok:
                self.close(force=True)
                raise WorkerError(f"worker rank {rank} failed:\n{value}")
            out[rank] = value
        return [out[r] for r in range(self.nprocs)]

    def close(self, *, force: bool = False) -> None:
        if not force:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(force=exc[0] is not None)


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any, threads: int | None = None,
          timeout_s: float = 600.0, **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` once on ``nprocs`` fresh local processes; results by rank.

    The processes get torchrun's environment but no process group: ``fn`` calls
    :meth:`shardwise.Mesh.init` itself, exactly as it would under torchrun.
    """
    with WorkerPool(nprocs, threads=threads, init_process_group=False,
                    timeout_s=timeout_s) as pool:
        return pool.run(fn, *args, **kwargs)
