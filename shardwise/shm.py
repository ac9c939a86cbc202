"""Shared-memory collectives for CPU process groups on one machine.

gloo sends every message through TCP loopback: about 1 ms per collective here, even for a few
KiB, and a tensor-parallel decode step issues dozens. Processes on one host can instead meet in
one shared-memory segment (DeepSpeed's CPU inference and vLLM's CPU backend do the same):

    segment = flags | 2 sets x (t input slots + 1 result area), each ``capacity`` bytes

* all-reduce: rank r copies its tensor into slot r and raises ``arrive[r]``; when every rank has
  arrived, rank r reduces chunk r of the result (slots summed in rank order 0, 1, ..., t-1),
  raises ``done[r]``; when all are done, every rank copies the whole result out. Every element
  is summed in the same order whichever rank computes it, so all ranks get bit-identical results.
* all-gather: copy in, arrive, copy every slot out. reduce-scatter: copy in, arrive, reduce own
  chunk. Messages larger than ``capacity`` go in pieces.

Calls alternate between the two sets: a rank can only reach call k+2 after every rank arrived at
call k+1, that is after every rank finished reading call k, so one barrier per phase suffices.

The all-reduce (sum, float dtypes) also runs as one C++ operator on the same segment and
protocol, ``shardwise::shm_all_reduce`` (``shardwise/kernels/shm.cpp``), once the native kernels
are loaded (:meth:`ShmCommunicator.attach_native`): a compiled decode step calls it without
Python, ~50-110 us saved per call (benchmarks/RESULTS.md, issue 10). Its calls are counted by
the ledger through the operator's own counters.

Robustness: the segment is unlinked as soon as every rank has attached (the mapping lives on
until the processes exit), so even SIGKILL leaks nothing. A wait that exceeds ``timeout_s``, or
a peer process that has died, raises instead of spinning forever. Stores to the flags follow the
data stores in program order (x86-TSO; on weakly ordered CPUs use gloo).
"""
from __future__ import annotations

import os
import socket
import time
import uuid
import weakref
from multiprocessing import resource_tracker, shared_memory

import numpy as np
import torch
import torch.distributed as dist

_FLAG_BYTES = 4096
SMALL = 64 << 10  # all-reduces up to this size use one barrier (every rank reduces everything)
NATIVE: dict[str, object] = {}  # group name -> the token of the segment the C++ operator holds


class PeerError(RuntimeError):
    """A peer did not arrive in time or died during a shared-memory collective."""


class ShmCommunicator:
    def __init__(self, group, *, capacity: int = 8 << 20, timeout_s: float = 300.0,
                 native: bool = True) -> None:
        self.group, self.name, self.allow_native = group, group.group_name, native
        self.t = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.capacity, self.timeout_s = capacity, timeout_s
        size = _FLAG_BYTES + 2 * (self.t + 1) * capacity
        name = [f"shardwise-{uuid.uuid4().hex[:16]}" if self.rank == 0 else None]
        dist.broadcast_object_list(name, src=dist.get_global_rank(group, 0), group=group)
        with _untracked():  # we unlink it ourselves, right after everyone attached
            if self.rank == 0:
                self.shm = shared_memory.SharedMemory(name=name[0], create=True, size=size)
            dist.barrier(group=group)
            if self.rank != 0:
                self.shm = shared_memory.SharedMemory(name=name[0])
            pids = [None] * self.t
            dist.all_gather_object(pids, os.getpid(), group=group)
            self.pids = pids
            dist.barrier(group=group)
            if self.rank == 0:
                self.shm.unlink()  # every rank is attached: nothing can leak from here on
        buf = torch.frombuffer(self.shm.buf, dtype=torch.uint8)
        self.flags = np.ndarray((2, self.t), dtype=np.int64, buffer=self.shm.buf)  # arrive, done
        self.sets = [[buf[_FLAG_BYTES + (s * (self.t + 1) + i) * capacity:][:capacity]
                      for i in range(self.t + 1)] for s in range(2)]
        self._seq = torch.zeros(1, dtype=torch.int64)  # shared with the C++ operator
        self._seq_np = self._seq.numpy()
        self.native = False
        self.attach_native()

    @property
    def seq(self) -> int:
        """This rank's collective calls on the segment so far (Python's and the operator's)."""
        return int(self._seq_np[0])

    @seq.setter
    def seq(self, value: int) -> None:
        self._seq_np[0] = value

    def attach_native(self) -> bool:
        """Let ``shardwise::shm_all_reduce`` run this group's sums (when the native kernels are
        loaded in this process already: this never starts their build)."""
        from . import kernels
        if self.allow_native and not self.native and kernels.loaded():
            segment = torch.frombuffer(self.shm.buf, dtype=torch.uint8)
            torch.ops.shardwise.shm_attach(self.name, segment, self.rank, self.t, self.capacity,
                                           self.pids, self.timeout_s, self._seq)
            self.native = True
            token = NATIVE[self.name] = object()
            # a group name can come back (a new process group after the old was destroyed):
            # the operator lets go of this segment when this communicator goes, not the next's
            weakref.finalize(self, _detach, self.name, token)
        return self.native

    # -------------------------------------------------------------- synchronisation
    def _signal(self, phase: int) -> None:
        self.flags[phase, self.rank] = self.seq

    def _wait(self, phase: int, op: str) -> None:
        row, target = self.flags[phase], self.seq
        spins, start, checked = 0, None, 0.0
        while row.min() < target:
            spins += 1
            if spins > 64:
                os.sched_yield()
                now = time.monotonic()
                start = start or now
                if now - checked >= 0.05:  # by the clock: a yield may last a whole time slice
                    checked = now
                    self._check_peers(row, target, op, now - start)

    def _check_peers(self, row, target, op, waited) -> None:
        late = [r for r in range(self.t) if row[r] < target]
        dead = [r for r in late if not _alive(self.pids[r])]
        if dead:
            raise PeerError(f"shared-memory {op}: rank(s) {dead} of the group "
                            f"(pid {[self.pids[r] for r in dead]}) died mid-collective")
        if waited > self.timeout_s:
            raise PeerError(f"shared-memory {op}: rank(s) {late} did not arrive within "
                            f"{self.timeout_s:.0f} s")

    def _next(self) -> list[torch.Tensor]:
        self.seq += 1
        return self.sets[self.seq % 2]

    @staticmethod
    def _view(slot: torch.Tensor, dtype: torch.dtype, n: int) -> torch.Tensor:
        return slot[: n * torch.empty((), dtype=dtype).element_size()].view(dtype)

    def _arrive(self, piece: torch.Tensor, op: str) -> list[torch.Tensor]:
        """Publish ``piece`` in this rank's slot of the next set; return the set once every rank
        has published its own."""
        slots = self._next()
        self._view(slots[self.rank], piece.dtype, piece.numel()).view(piece.shape).copy_(piece)
        self._signal(0)
        self._wait(0, op)
        return slots

    def _step(self, dtype: torch.dtype) -> int:
        return self.capacity // torch.empty((), dtype=dtype).element_size()

    # -------------------------------------------------------------- collectives
    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> None:
        """In place: ``x`` becomes the elementwise sum (or max) over the group. Small messages
        (<= ``SMALL`` bytes) skip the second phase: every rank reduces the whole message itself,
        in the same order, which costs one barrier instead of two."""
        flat = x.view(-1)
        step = self._step(x.dtype)
        small = flat.numel() * x.element_size() <= SMALL
        for off in range(0, flat.numel(), step):
            piece = flat[off:off + step]
            n = piece.numel()
            slots = self._arrive(piece, "all_reduce")
            if small:
                _reduce_into(piece, [self._view(s, x.dtype, n) for s in slots[: self.t]], op)
                continue
            lo, hi = n * self.rank // self.t, n * (self.rank + 1) // self.t
            out = self._view(slots[self.t], x.dtype, n)[lo:hi]
            _reduce_into(out, [self._view(s, x.dtype, n)[lo:hi] for s in slots[: self.t]], op)
            self._signal(1)
            self._wait(1, "all_reduce")
            piece.copy_(self._view(slots[self.t], x.dtype, n))

    def all_gather(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """``out`` (t * x.numel() elements) <- every rank's ``x`` in rank order."""
        flat, dst = x.reshape(-1), out.view(self.t, -1)
        step = self._step(x.dtype)
        for off in range(0, flat.numel(), step):
            piece = flat[off:off + step]
            n = piece.numel()
            slots = self._arrive(piece, "all_gather")
            for r in range(self.t):
                dst[r, off:off + n].copy_(self._view(slots[r], x.dtype, n))

    def reduce_scatter(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """``out`` <- chunk ``rank`` of the sum over the group of ``x`` (t equal chunks)."""
        src, dst = x.reshape(self.t, -1), out.view(-1)
        m = src.shape[1]
        step = max(1, self._step(x.dtype) // self.t)
        for off in range(0, m, step):
            n = min(step, m - off)
            slots = self._arrive(src[:, off:off + n], "reduce_scatter")  # stored as (t, n)
            parts = [self._view(s, x.dtype, n * self.t).view(self.t, n)[self.rank]
                     for s in slots[: self.t]]
            _reduce_into(dst[off:off + n], parts, "sum")
            # the next call of this rank reuses the other set: no second barrier needed

    def close(self) -> None:
        try:
            if self.native:
                _detach(self.name, NATIVE.get(self.name))
                self.native = False
            self.sets, self.flags = [], None
            self.shm.close()
        except Exception:  # noqa: BLE001 - views may still be alive; the OS unmaps at exit
            pass


def _detach(name: str, token: object) -> None:
    if token is not None and NATIVE.get(name) is token:
        del NATIVE[name]
        torch.ops.shardwise.shm_detach(name)


class _untracked:
    """Keep Python's resource tracker out of it: ranks share one tracker process under spawn, and
    it would unlink (or warn about) a segment that is ours to unlink."""

    def __enter__(self) -> None:
        self.saved = resource_tracker.register, resource_tracker.unregister
        resource_tracker.register = resource_tracker.unregister = lambda *a, **k: None

    def __exit__(self, *exc) -> None:
        resource_tracker.register, resource_tracker.unregister = self.saved


def _reduce_into(out: torch.Tensor, parts: list[torch.Tensor], op: str) -> None:
    """Fixed order: parts[0] op parts[1] op ... (the same on every rank)."""
    if op == "sum":
        torch.add(parts[0], parts[1], out=out) if len(parts) > 1 else out.copy_(parts[0])
        for p in parts[2:]:
            out.add_(p)
    elif op == "max":
        torch.maximum(parts[0], parts[1], out=out) if len(parts) > 1 else out.copy_(parts[0])
        for p in parts[2:]:
            torch.maximum(out, p, out=out)
    else:
        raise ValueError(f"shared-memory reduction {op!r} is not supported (sum, max)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def same_host(group) -> bool:
    """Whether every rank of ``group`` runs on this host (collective over the group)."""
    me = (socket.gethostname(), _boot_id())
    hosts = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, me, group=group)
    return all(h == me for h in hosts)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""
