"""Glue between a pipeline stage of the TP model, DDP and torch.distributed.pipelining.

One step of a replica runs ``A = global_batch / (micro_batch x dp)`` micro-batches and leaves
``grad = (1 / A) sum_m dL_m/dtheta`` (the mean of micro-batch mean losses) in every parameter,
averaged over DP by DDP:

* ``pp == 1``: a plain loop; DDP's all-reduce only after the last micro-batch (``no_sync``);
* ``pp > 1``: a :class:`~torch.distributed.pipelining.PipelineStage` over this rank's layers,
  driven by ``ScheduleGPipe`` or ``Schedule1F1B`` (``scale_grads=True`` divides by ``A``); the
  stage sends ``(b, s, h)`` activations, ``(b, s / tp, h)`` under sequence parallelism, to the
  same TP rank of the next stage. The schedule drives DDP's ``no_sync`` itself.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..loss import vocab_parallel_cross_entropy
from ..mesh import Mesh


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (its TP collectives run again, deterministically)."""
    for layer in model.model.layers.values():
        fwd = layer.forward
        layer.forward = functools.partial(checkpoint, fwd, use_reentrant=False)


@contextlib.contextmanager
def _p2p_unwrapped():
    """Hand pipelining the real ``dist.isend`` / ``dist.irecv`` while a :class:`Ledger` is active:
    ``dist.P2POp`` rejects any other function (an identity check), so the ledger's wrappers break
    ``batch_isend_irecv``. Pipeline send/recv time is therefore not in the comm fraction."""
    from ..comm import Ledger
    saved = {op: getattr(dist, op) for op in ("isend", "irecv")}
    for op in saved:
        if op in Ledger._originals:
            setattr(dist, op, Ledger._originals[op])
    try:
        yield
    finally:
        for op, fn in saved.items():
            setattr(dist, op, fn)


class StageRunner:
    """Runs one training step's forward/backward of this rank's stage over its micro-batches."""

    def __init__(self, model: nn.Module, mesh: Mesh, *, micro_batches: int, schedule: str = "1f1b",
                 bf16: bool = False) -> None:
        self.model, self.mesh, self.micro_batches = model, mesh, micro_batches
        self.autocast = functools.partial(torch.autocast, mesh.device.type, dtype=torch.bfloat16,
                                          enabled=bf16)
        self.wrapped: nn.Module = model
        if mesh.dp > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.wrapped = DDP(model, process_group=mesh.dp_group,
                               device_ids=None if mesh.device.type == "cpu" else [mesh.device])
        self.schedule = None
        if mesh.pp > 1:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
            stage = PipelineStage(self.wrapped, mesh.pp_rank, mesh.pp, mesh.device,
                                  group=mesh.pp_group)
            cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
            self.schedule = cls(stage, n_microbatches=micro_batches, loss_fn=self.loss_fn)

    def loss_fn(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of vocabulary-parallel logits ``(b, s, V/t)`` against ``(b, s)``."""
        head = self.model.lm_head
        return vocab_parallel_cross_entropy(logits, target, group=self.mesh.tp_group,
                                            vocab_start=head.start, vocab_size=head.num_embeddings)

    def step(self, ids: torch.Tensor, targets: torch.Tensor) -> float | None:
        """``ids``, ``targets``: ``(A x b, s)``. Returns the mean micro-batch loss on the last
        stage, ``None`` elsewhere. Gradients are left in the parameters (not yet TP-finalised)."""
        ids, targets = ids.to(self.mesh.device), targets.to(self.mesh.device)
        if self.schedule is not None:
            return self._pipeline_step(ids, targets)
        total = 0.0
        for m, (x, y) in enumerate(zip(ids.chunk(self.micro_batches), targets.chunk(self.micro_batches))):
            last = m == self.micro_batches - 1
            sync = contextlib.nullcontext() if last or self.mesh.dp == 1 else self.wrapped.no_sync()
            with sync:
                with self.autocast():
                    loss = self.loss_fn(self.wrapped(x), y)
                (loss / self.micro_batches).backward()
            total += float(loss.detach())
        return total / self.micro_batches

    def _pipeline_step(self, ids: torch.Tensor, targets: torch.Tensor) -> float | None:
        first, last = self.mesh.pp_rank == 0, self.mesh.pp_rank == self.mesh.pp - 1
        losses: list[torch.Tensor] = []
        with self.autocast(), _p2p_unwrapped():
            if first:
                self.schedule.step(ids)
            elif last:
                self.schedule.step(target=targets, losses=losses)
            else:
                self.schedule.step()
        if not last:
            return None
        return float(torch.stack([l.detach().float() for l in losses]).mean())
