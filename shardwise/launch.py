"""Run a function on N local processes: the launcher used by tests and the CLI.

Multi-node runs go through ``torchrun`` instead; both set the same environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), which :meth:`shardwise.Mesh.init` reads.

* :func:`spawn` runs ``fn(*args)`` once on each of N fresh processes and returns their results.
* :class:`WorkerPool` keeps N processes (and their process group) alive and runs many tasks on
  them: a test module pays the start-up of N processes once.

Workers start from a fork server that has imported torch once (``forkserver``, where the platform
has it; ``spawn`` elsewhere): a worker then costs a fork instead of a fresh interpreter importing
torch (~1.5 s each, all at once on a small machine). Each worker is pinned to its own cores
(:mod:`shardwise.affinity`: disjoint cores per rank, NUMA aware) and runs as many torch threads as
it has cores: two ranks with two threads each on two cores run several times slower than with one
(see REFERENCES.md).

Failures (:mod:`shardwise.failure`): each worker posts every phase it enters and, on an exception,
its rank, phase and traceback at once. On the first failure the parent waits a moment for the
others (a failure that only echoes a peer's, such as a closed connection, waits up to
``PEER_WAIT_S`` for the original), kills every worker (peers blocked in a collective included)
and raises :class:`WorkerError` naming the rank, the phase and the original error. A worker that
dies without a word (SIGKILL, a crash in C) is named with its signal and its last phase.
"""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import socket
import time
from typing import Any, Callable

import torch

from . import failure
from .failure import Failure, WorkerError  # noqa: F401 - WorkerError is raised from here

SETTLE_S = 0.3     # after a first failure: let near-simultaneous reports and deaths arrive
PEER_WAIT_S = 3.0  # when every failure so far only echoes a peer's: wait this long for the origin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(nprocs: int) -> int:
    return max(1, (os.cpu_count() or 1) // nprocs)


def context() -> Any:
    """The multiprocessing context workers start from: a fork server that preloads torch."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
        return ctx
    return mp.get_context("spawn")


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
    failure.install(rank, results.send)  # synchronous: a phase is known even if killed next
    try:
        with failure.phase("start"):
            if init_pg and world > 1:
                import torch.distributed as dist
                from datetime import timedelta
                dist.init_process_group("gloo", rank=rank, world_size=world,
                                        timeout=timedelta(seconds=120))
    except BaseException:  # noqa: BLE001 - reported; the parent ends the run
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            with failure.phase("run"):
                value = fn(*args, **kwargs)
        except BaseException:  # noqa: BLE001 - reported by phase(); the parent ends the run
            continue
        results.send(("done", rank, value))
    try:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def original(failures: dict[int, Failure]) -> tuple[Failure, list[Failure]]:
    """The failure that started it (the earliest that is not a peer's echo) and the others."""
    ranked = sorted(failures.values(), key=lambda f: (f.peer, f.at, f.rank))
    return ranked[0], ranked[1:]


class WorkerPool:
    """N long-lived local processes, each with ``RANK``/``WORLD_SIZE`` set and (by default) the
    gloo process group initialised. ``pool.run(fn, *args)`` calls ``fn(*args)`` on every rank and
    returns the list of results by rank. ``fn`` must be importable (a module-level function)."""

    def __init__(self, nprocs: int, *, threads: int | None = None, init_process_group: bool = True,
                 timeout_s: float = 300.0) -> None:
        ctx = context()
        self.nprocs, self.timeout_s = nprocs, timeout_s
        port = free_port()
        self.phases = ["start"] * nprocs
        self._tasks = [ctx.Queue() for _ in range(nprocs)]
        pipes = [ctx.Pipe(duplex=False) for _ in range(nprocs)]  # (parent end, worker end)
        self._results = [recv for recv, _ in pipes]
        self._procs = [ctx.Process(target=_worker, daemon=True,
                                   args=(r, nprocs, port, threads, init_process_group,
                                         self._tasks[r], pipes[r][1]))
                       for r in range(nprocs)]
        for p in self._procs:
            p.start()
        for _, send in pipes:
            send.close()  # the worker holds its end: a dead worker closes the pipe

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None,
            **kwargs: Any) -> list[Any]:
        for q in self._tasks:
            q.put((fn, args, kwargs))
        return self._collect(timeout_s or self.timeout_s)

    def _collect(self, timeout_s: float) -> list[Any]:
        out: dict[int, Any] = {}
        failures: dict[int, Failure] = {}
        deadline, first = time.monotonic() + timeout_s, None
        while len(out) < self.nprocs:
            open_ = [c for r, c in enumerate(self._results) if r not in failures]
            for conn in mp_connection.wait(open_, timeout=0.1):
                rank = self._results.index(conn)
                try:
                    kind, _, value = conn.recv()
                except (EOFError, OSError):  # died without a word: SIGKILL, a crash in C
                    self._procs[rank].join(timeout=5)
                    failures[rank] = failure.death(rank, self.phases[rank],
                                                   self._procs[rank].exitcode)
                    continue
                if kind == "phase":
                    self.phases[rank] = value
                elif kind == "done":
                    out[rank] = value
                elif kind == "failed":
                    failures[rank] = value
            now = time.monotonic()
            if failures:
                first = first or now
                wait = SETTLE_S if any(not f.peer for f in failures.values()) else PEER_WAIT_S
                if now - first >= wait:
                    self.close(force=True)
                    orig, others = original(failures)
                    raise WorkerError(orig.describe(others), orig, others)
            elif now > deadline:
                self.close(force=True)
                where = ", ".join(f"rank {r} in '{ph}'" for r, ph in enumerate(self.phases)
                                  if r not in out)
                raise WorkerError(f"workers timed out after {timeout_s:.0f} s ({where}); "
                                  f"results from ranks {sorted(out)} only")
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
        for p in self._procs:
            p.join(timeout=5)
        for c in self._results:
            c.close()

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
