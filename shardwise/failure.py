"""Which rank failed, in which phase, with which error: what a failed run tells its user.

A worker names what it is doing::

    with phase("load"):
        load_weights(model, directory)

Under a local launcher (:mod:`shardwise.launch`, the server's engine client) :func:`install` gives
each worker a channel to its parent: every phase it enters, and the first exception, are posted
at once (the exception before any cleanup that could wait on a peer forever: a barrier in a
``finally``, a collective the other ranks never join). The parent then kills every worker, peers
blocked in a collective included, and reports the original :class:`Failure`. Under torchrun
nothing is installed: the exception gets a note naming the rank and the phase, and torchrun's
agent stops the other ranks.

An error that only echoes another rank's failure (gloo's "Connection closed by peer", a collective
timeout, NCCL's abort) is marked ``peer``, so that the parent names the rank that failed first.
"""
from __future__ import annotations

import signal
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

# Messages of errors raised in rank A because rank B died or stopped answering (gloo, NCCL,
# the shared-memory collectives of shardwise.shm).
PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "Timed out", "timed out", "Socket Timeout", "NCCL communicator was aborted",
              "ProcessGroupNCCL is aborted", "died mid-collective", "did not arrive within")


@dataclass(frozen=True)
class Failure:
    """One rank's failure: its phase, the error's last line, the full traceback."""

    rank: int
    phase: str
    error: str
    traceback: str = ""
    peer: bool = False
    at: float = 0.0  # time.time() when it was raised (or the death was seen)

    def headline(self) -> str:
        echo = " (a consequence of another rank's failure)" if self.peer else ""
        return f"rank {self.rank} failed in phase '{self.phase}': {self.error}{echo}"

    def describe(self, others: list["Failure"] | tuple["Failure", ...] = ()) -> str:
        """The headline, the traceback, then one line per other failed rank."""
        text = self.headline()
        if self.traceback:
            text += f"\n--- rank {self.rank}, phase '{self.phase}' ---\n{self.traceback.rstrip()}"
        for o in others:
            text += f"\nalso {o.headline()}"
        return text


class WorkerError(RuntimeError):
    """A worker process raised or died: ``failure`` is the original one, ``others`` the rest
    (raised by :mod:`shardwise.launch`; defined here so that the CLI catches it without torch)."""

    def __init__(self, message: str, failure: Failure | None = None,
                 others: list[Failure] | None = None) -> None:
        super().__init__(message)
        self.failure, self.others = failure, others or []


def death(rank: int, phase: str, exitcode: int | None) -> Failure:
    """A rank that exited without reporting an error (killed, crashed in C, ``os._exit``)."""
    if exitcode is not None and exitcode < 0:
        try:
            how = f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"killed by signal {-exitcode}"
    else:
        how = f"exit code {exitcode}, no error reported"
    return Failure(rank, phase, f"the process died ({how})", at=time.time())


def is_peer_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(sign in text for sign in PEER_SIGNS)


def failure_of(exc: BaseException, rank: int, phase_name: str) -> Failure:
    lines = traceback.format_exception_only(type(exc), exc)
    error = lines[-1].strip() if lines else type(exc).__name__
    return Failure(rank, phase_name, error, "".join(traceback.format_exception(exc)),
                   peer=is_peer_error(exc), at=time.time())


_rank: int | None = None
_post: Callable[[tuple], Any] | None = None
_phase = "run"


def install(rank: int, post: Callable[[tuple], Any]) -> None:
    """Post ``("phase", rank, name)`` and ``("failed", rank, Failure)`` through ``post``."""
    global _rank, _post
    _rank, _post = rank, post


def current_phase() -> str:
    return _phase


def report(exc: BaseException) -> None:
    """Post ``exc`` as this rank's failure in the current phase (once per exception)."""
    if getattr(exc, "_shardwise_reported", False) or \
            (isinstance(exc, SystemExit) and exc.code in (0, None)):
        return
    try:
        exc._shardwise_reported = True  # type: ignore[attr-defined]
    except AttributeError:
        pass
    if _post is not None:
        _post(("failed", _rank, failure_of(exc, _rank if _rank is not None else -1, _phase)))
        return
    import torch.distributed as dist
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else "?"
    exc.add_note(f"[shardwise] rank {rank} failed in phase '{_phase}'")


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Run the block as phase ``name``; an exception leaving it is reported at once."""
    global _phase
    prev, _phase = _phase, name
    if _post is not None:
        _post(("phase", _rank, name))
    try:
        yield
    except BaseException as exc:
        report(exc)
        raise
    finally:
        _phase = prev
