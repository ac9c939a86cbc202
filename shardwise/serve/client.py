"""The server's handle on the TP workers: start them, submit and cancel requests, watch them die.

The server process spawns ``tp`` worker processes (:func:`shardwise.serve.engine.worker_main`);
under torchrun (``in_process``) the server is itself TP rank 0 and runs the engine in a thread
(:class:`EngineThread`), the other ranks being torchrun's processes.
Rank 0 reads commands from one queue and writes events to another. A thread here reads the
events and hands each request's tokens to its ``asyncio.Queue`` on the server's event loop. The
same thread checks that every worker is alive: one that exits while the server has not asked it
to is fatal (every waiting request gets an error and :attr:`EngineClient.dead` says why). Every
rank also posts its phase and, on an exception, its :class:`~shardwise.failure.Failure` to the
event queue, so a failure on any rank names that rank, its phase and its error.
A request the engine refuses or fails on its own (a ``fail`` event) gets its error alone.

A sequence's queue receives ``("prompt", entries)`` items (the prompt's log-probabilities, when
asked), ``("token", tok, finish_reason, logprobs, time)`` items, then ends; or one
``("error", message, status, code)``.
"""
from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import os
import queue
import threading
import time
from typing import Any, Callable

from ..failure import Failure
from ..launch import PEER_WAIT_S, free_port
from .engine import EngineConfig, run_rank, worker_main
from .scheduler import Request, SamplerSpec


class EngineDead(RuntimeError):
    """A TP worker died or failed."""


class EngineThread(threading.Thread):
    """TP rank 0 of a torchrun job, in the server's own process: what the client watches of a
    worker process (alive, exit code, pid), for a thread."""

    def __init__(self, cfg: EngineConfig, cmd_q: queue.Queue, evt_q: queue.Queue) -> None:
        super().__init__(daemon=True, name="shardwise-tp0")
        self.cfg, self.cmd_q, self.evt_q = cfg, cmd_q, evt_q
        self.failed = False
        self.pid = os.getpid()

    def run(self) -> None:
        try:
            run_rank(self.cfg, self.cmd_q, self.evt_q)
        except BaseException:  # noqa: BLE001 - reported through the event queue by run_rank
            self.failed = True

    @property
    def exitcode(self) -> int | None:
        return None if self.is_alive() else int(self.failed)

    def kill(self) -> None:
        """A thread cannot be killed: it ends with the process (a daemon thread)."""


class EngineClient:
    def __init__(self, cfg: EngineConfig, *, in_process: bool = False) -> None:
        self.cfg = cfg
        if in_process:
            self._cmd, self._evt = queue.Queue(), queue.Queue()
            self.procs: list = [EngineThread(cfg, self._cmd, self._evt)]
        else:
            ctx = mp.get_context("spawn")
            self._cmd, self._evt = ctx.Queue(), ctx.Queue()
            port = free_port()
            self.procs = [ctx.Process(target=worker_main, daemon=True, name=f"shardwise-tp{r}",
                                      args=(r, cfg, port, self._cmd, self._evt, os.getpid()))
                          for r in range(cfg.world)]
        self.info: dict[str, Any] = {}
        self.phases = ["start"] * len(self.procs)
        self.dead: str | None = None
        self.stopping = False
        self._ids = itertools.count(1)
        self._streams: dict[int, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.on_stats: Callable[[dict], None] | None = None
        self.on_dead: Callable[[str], None] | None = None

    @property
    def pids(self) -> list[int]:
        """Every TP rank's process id (rank 0 reports them all once ready)."""
        return self.info.get("pids") or [p.pid for p in self.procs if p.pid is not None]

    def start(self, timeout_s: float = 600.0) -> dict[str, Any]:
        """Start the workers and wait until rank 0 reports ready (the model loaded)."""
        for p in self.procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                msg = self._evt.get(timeout=0.5)
            except queue.Empty:
                bad = self._exited()
                if bad:
                    self.kill()
                    raise EngineDead(f"TP worker {bad} while starting")
                continue
            if msg[0] == "ready":
                self.info = msg[1]
                return self.info
            if msg[0] == "phase":
                self.phases[msg[1]] = msg[2]
            elif msg[0] == "failed":
                self.kill()
                raise EngineDead(msg[2].describe())
        self.kill()
        where = ", ".join(f"rank {r} in '{p}'" for r, p in enumerate(self.phases))
        raise EngineDead(f"the TP workers were not ready after {timeout_s:.0f} s ({where})")

    def _failure_reason(self, f: Failure) -> str:
        """``f``, or, when ``f`` only echoes a peer's failure, the peer that died first."""
        deadline = time.monotonic() + PEER_WAIT_S
        while f.peer and time.monotonic() < deadline:
            bad = self._exited(other_than=f.rank)
            if bad:
                return f"TP worker {bad}; then {f.headline()}"
            time.sleep(0.05)
        return "TP worker " + f.describe()

    def _exited(self, other_than: int | None = None) -> str | None:
        gone = [(r, p.exitcode) for r, p in enumerate(self.procs)
                if not p.is_alive() and r != other_than]
        return ", ".join(f"rank {r} (exit code {c}) died in phase '{self.phases[r]}'"
                         for r, c in gone) or None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start delivering events to ``loop`` (call from the server's startup)."""
        self._loop = loop
        self._thread = threading.Thread(target=self._pump, daemon=True, name="engine-events")
        self._thread.start()

    def _pump(self) -> None:
        assert self._loop is not None
        while True:
            try:
                msg = self._evt.get(timeout=0.2)
            except queue.Empty:
                msg = None
            except (EOFError, OSError):
                msg = ("error", "the event queue from TP rank 0 broke")
            if msg is not None and msg[0] in ("step", "stats", "fail"):
                self._loop.call_soon_threadsafe(self._deliver, msg)
                continue
            if msg is not None and msg[0] == "phase":
                self.phases[msg[1]] = msg[2]
                continue
            if msg is not None and msg[0] == "failed":
                reason = self._failure_reason(msg[2])
            elif msg is not None and msg[0] == "error":  # the event queue broke
                reason = msg[1]
            else:
                bad = self._exited()
                if bad is None:
                    continue
                if self.stopping:
                    return
                reason = f"TP worker {bad} died"
            self._loop.call_soon_threadsafe(self._fail, reason)
            return

    def _deliver(self, msg: tuple) -> None:
        now = time.perf_counter()
        if msg[0] == "fail":
            _, sid, status, why = msg
            q = self._streams.pop(sid, None)
            if q is not None:
                q.put_nowait(("error", why, status,
                              "invalid_value" if status < 500 else "engine_error"))
            return
        if msg[0] == "step":
            for sid, entries in msg[2]:
                q = self._streams.get(sid)
                if q is not None:
                    q.put_nowait(("prompt", entries))
            for sid, tok, reason, lp in msg[1]:
                q = self._streams.get(sid)
                if q is not None:
                    q.put_nowait(("token", tok, reason, lp, now))
                    if reason is not None:
                        self._streams.pop(sid, None)
        if self.on_stats:
            self.on_stats(msg[-1])

    def _fail(self, reason: str) -> None:
        if self.dead:
            return
        self.dead = reason
        for q in self._streams.values():
            q.put_nowait(("error", reason, 503, "worker_died"))
        self._streams.clear()
        self.kill()
        if self.on_dead:
            self.on_dead(reason)

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: list[int], specs: list[SamplerSpec], max_tokens: int,
               eos_ids: list[int], *, grammar: str | None = None
               ) -> list[tuple[int, asyncio.Queue]]:
        """Submit ``len(specs)`` samples of one prompt (they share its prefill); returns each
        sample's sequence id and queue."""
        if self.dead:
            raise EngineDead(self.dead)
        out = [(next(self._ids), asyncio.Queue()) for _ in specs]
        self._streams.update(out)
        self._cmd.put(("add", Request([sid for sid, _ in out], list(prompt), list(specs),
                                      max_tokens, list(eos_ids), grammar)))
        return out

    def cancel(self, sid: int) -> None:
        if self._streams.pop(sid, None) is not None and not self.dead:
            self._cmd.put(("cancel", sid))

    # ------------------------------------------------------------------ shutdown
    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask rank 0 to finish its work and stop every rank; kill what does not stop."""
        self.stopping = True
        if not self.dead:
            self._cmd.put(("stop",))
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5 if isinstance(p, mp.process.BaseProcess) else 0.1)
