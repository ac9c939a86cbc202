"""The collective ledger: counts (calls, bytes, seconds) of every collective while active.

It wraps the functions of ``torch.distributed`` for its lifetime, so a raw ``dist.all_reduce``
anywhere is counted too; collectives that bypass torch.distributed (shared memory) report
themselves with :func:`record`, or, from C++ (``shardwise::shm_all_reduce``, which a compiled
graph calls without Python), through the operator's counters that a ledger reads. Kinds merge
old and new names (``all_gather_into_tensor`` and
``all_gather_single`` are both "all_gather"); pipeline send/recv counts as "p2p" through
``batch_isend_irecv`` (wrapping ``isend``/``irecv`` would break ``P2POp``'s identity check).
"""
from __future__ import annotations

import functools
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

# torch.distributed function -> the kind it is counted as (old and new names count the same)
_OPS = {"all_reduce": "all_reduce", "all_gather": "all_gather",
        "all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
        "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_single": "reduce_scatter",
        "reduce_scatter": "reduce_scatter", "broadcast": "broadcast",
        "all_to_all_single": "all_to_all", "send": "p2p", "recv": "p2p",
        "batch_isend_irecv": "p2p", "barrier": "barrier", "broadcast_object_list": "broadcast_object",
        "all_gather_object": "all_gather_object"}
_depth = threading.local()


def _nbytes(op: str, args: tuple, kwargs: dict) -> int:
    """Message size S in nccl-tests' sense: the full (gathered / unreduced) buffer."""
    if not args:
        return 0
    first = args[0]
    if op == "batch_isend_irecv":  # a list of P2POp
        return sum(o.tensor.numel() * o.tensor.element_size() for o in first)
    if op == "all_gather" and isinstance(first, (list, tuple)):
        return sum(t.numel() * t.element_size() for t in first)
    if op == "reduce_scatter" and len(args) > 1:
        return sum(t.numel() * t.element_size() for t in args[1])
    if op in ("reduce_scatter_tensor", "reduce_scatter_single") and len(args) > 1:
        return args[1].numel() * args[1].element_size()
    if isinstance(first, torch.Tensor):
        return first.numel() * first.element_size()
    return 0


@dataclass
class Tally:
    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


class Ledger:
    """Counts collectives (calls, bytes, wall seconds) by kind while active.

    >>> with Ledger() as ledger:
    ...     y = model(x)
    >>> ledger.calls("all_reduce")

    Seconds are the time spent inside the call: for synchronous collectives that is the cost the
    rank waited for; for ``async_op=True`` it is only the launch.
    """

    _active: list["Ledger"] = []
    _originals: dict[str, Callable[..., Any]] = {}
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._tally: dict[str, Tally] = defaultdict(Tally)
        self._native: list[int] | None = None  # the C++ all-reduce's counters when last read

    @property
    def tally(self) -> dict[str, Tally]:
        if self._native is not None:  # active: take in the native all-reduces since last read
            now = _native_counters()
            calls, nbytes, nanos = (a - b for a, b in zip(now, self._native))
            if calls:
                self.record("all_reduce", nbytes, nanos / 1e9, calls)
            self._native = now
        return self._tally

    def calls(self, kind: str | None = None) -> int:
        return sum(t.calls for k, t in self.tally.items() if kind in (None, k))

    def bytes(self, kind: str | None = None) -> int:
        return sum(t.bytes for k, t in self.tally.items() if kind in (None, k))

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.tally.values())

    def counts(self) -> dict[str, int]:
        return {k: t.calls for k, t in sorted(self.tally.items()) if t.calls}

    def summary(self) -> dict[str, dict[str, float]]:
        return {k: {"calls": t.calls, "bytes": t.bytes, "seconds": round(t.seconds, 6)}
                for k, t in sorted(self.tally.items()) if t.calls}

    def reset(self) -> None:
        self.tally.clear()

    def record(self, kind: str, nbytes: int, seconds: float, calls: int = 1) -> None:
        t = self._tally[kind]
        t.calls += calls
        t.bytes += nbytes
        t.seconds += seconds

    def __enter__(self) -> "Ledger":
        with Ledger._lock:
            if not Ledger._active:
                _install()
            Ledger._active.append(self)
        self._native = _native_counters()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tally  # noqa: B018 - the native all-reduces up to here
        self._native = None
        with Ledger._lock:
            Ledger._active.remove(self)
            if not Ledger._active:
                _uninstall()


def record(kind: str, nbytes: int, seconds: float) -> None:
    """Report a collective that did not go through ``torch.distributed`` (e.g. shared memory)."""
    for ledger in Ledger._active:
        ledger.record(kind, nbytes, seconds)


def _native_counters() -> list[int]:
    """(calls, bytes, nanoseconds) of ``shardwise::shm_all_reduce`` in this process so far
    (zeros before the kernels are loaded: the counters start there)."""
    from . import kernels
    return list(torch.ops.shardwise.shm_counters()) if kernels.loaded() else [0, 0, 0]


def _wrap(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def counted(*args: Any, **kwargs: Any) -> Any:
        if getattr(_depth, "n", 0):  # a wrapped function calling another: count once
            return fn(*args, **kwargs)
        _depth.n = 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _depth.n = 0
            record(_OPS[op], _nbytes(op, args, kwargs), time.perf_counter() - start)
    return counted


def _install() -> None:
    for op in _OPS:
        if hasattr(dist, op):
            Ledger._originals[op] = getattr(dist, op)
            setattr(dist, op, _wrap(op, getattr(dist, op)))


def _uninstall() -> None:
    for op, fn in Ledger._originals.items():
        setattr(dist, op, fn)
    Ledger._originals.clear()



class Unrecorded:
    """Set-up traffic (exchanging a segment name) is not the workload: keep it off the ledger."""

    def __enter__(self) -> None:
        self.prev = getattr(_depth, "n", 0)
        _depth.n = 1

    def __exit__(self, *exc: Any) -> None:
        _depth.n = self.prev
