"""Fault injection for tests (no tests here): one rank raises inside the real work of one phase.

:func:`install` patches the function a phase runs so that it raises on rank ``RANK`` (read from
the environment when called: the launcher sets it in each worker; the launching process has none
and never fails):

========== ===================================================================================
build      ``LlamaForCausalLM.__init__`` (building the stage)
init       ``shards.init_weights`` (random initialisation)
load       ``checkpoint.hf.load_weights`` (reading the checkpoint slice)
step       ``train.pipeline.StageRunner.step`` (the first training step)
sendrecv   torch.distributed.pipelining's batched p2p send/recv
save       ``torch.save`` and ``safetensors.torch.save_file`` (disk full while saving)
========== ===================================================================================

As a script, ``python tests/faults.py PHASE RANK <shardwise arguments>`` runs the shardwise
command with the fault installed in every process: multiprocessing's spawn and forkserver
children re-import this file as their main module (with the parent's ``sys.argv``), so the
patch below runs in each worker too.
"""
from __future__ import annotations

import errno
import functools
import os
import re
import sys
import time

MESSAGE = "injected fault"


def fault_time(text: str) -> float:
    """When the injected fault was raised (``time.time()``), from an error message."""
    m = re.search(MESSAGE + r"[^\n]*? at t=([0-9.]+)", text)
    assert m, f"no injected fault in:\n{text[-2000:]}"
    return float(m.group(1))


def _on(rank: int, phase: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        real = not (phase == "sendrecv" and not args[0])  # an empty batch sends nothing
        if real and int(os.environ.get("RANK", "-1")) == rank:
            what = f"{MESSAGE}: rank {rank} in {phase} at t={time.time():.3f}"
            if phase == "save":
                raise OSError(errno.ENOSPC, f"No space left on device ({what})")
            raise RuntimeError(what)
        return fn(*args, **kwargs)
    return wrapper


def install(phase: str, rank: int) -> None:
    if phase == "build":
        from shardwise.models.llama import LlamaForCausalLM as cls
        cls.__init__ = _on(rank, phase, cls.__init__)
    elif phase == "init":
        import shardwise.shards as mod
        mod.init_weights = _on(rank, phase, mod.init_weights)
    elif phase == "load":
        import shardwise.checkpoint.hf as mod
        mod.load_weights = _on(rank, phase, mod.load_weights)
    elif phase == "step":
        from shardwise.train.pipeline import StageRunner as cls
        cls.step = _on(rank, phase, cls.step)
    elif phase == "sendrecv":
        import torch.distributed.pipelining.schedules as mod
        mod._batch_p2p = _on(rank, phase, mod._batch_p2p)
    elif phase == "save":
        import safetensors.torch
        import torch
        torch.save = _on(rank, phase, torch.save)
        safetensors.torch.save_file = _on(rank, phase, safetensors.torch.save_file)
    else:
        raise ValueError(f"unknown phase {phase!r}")


def inject_then(phase: str, rank: int, fn, *args):
    """Worker body for :func:`shardwise.launch.spawn`: install the fault, then run ``fn``."""
    install(phase, rank)
    return fn(*args)


if len(sys.argv) > 3 and __name__ in ("__main__", "__mp_main__"):
    install(sys.argv[1], int(sys.argv[2]))

if __name__ == "__main__":
    from shardwise.cli import main
    sys.exit(main(sys.argv[3:]))
