"""Glue between a pipeline stage of the TP model, DDP and torch.distributed.pipelining.

One step of a replica runs ``A = global_batch / (micro_batch x dp)`` micro-batches and leaves
``grad = (1 / A) sum_m dL_m/dtheta`` (the mean of micro-batch mean losses) in every parameter,
averaged over DP by DDP:

* ``pp == 1``: a plain loop; DDP's all-reduce only after the last micro-batch (``no_sync``),
  gradients as views of DDP's buckets (one copy of the gradients, not two);
* ``pp > 1``: a :class:`~torch.distributed.pipelining.PipelineStage` over this rank's layers,
  driven by ``ScheduleGPipe`` or ``Schedule1F1B`` (``scale_grads=True`` divides by ``A``); the
  stage sends ``(b, s, h)`` activations, ``(b, s / tp, h)`` under sequence parallelism, to the
  same TP rank of the next stage; DP averaging is one flat all-reduce after the schedule
  (:func:`average_grads`), because DDP wrapped in a PipelineStage trips an internal assert of
  torch 2.13's reducer when a step has more than one micro-batch.

A mixture-of-experts model adds its load-balancing loss, ``router_aux_loss_coef x aux``, to every
micro-batch's loss (:func:`shardwise.models.moe.load_balancing_loss`; with ``ep > 1`` each rank
adds ``ep x`` its share, so that the mean over the EP group is the whole batch's). Its DP
gradients are averaged by :func:`average_grads` after the last micro-batch, not by DDP: an
expert no token of a micro-batch chose has no gradient, which DDP only tolerates with
``find_unused_parameters`` (a graph traversal per step, and a warning whenever every expert was
used).

Under ZeRO (``zero`` 1 or 2) neither DDP nor :func:`average_grads` runs: the optimizer
(:class:`~shardwise.train.zero.ZeroAdamW`) reduce-scatters the gradients itself, and the schedule
leaves them summed over micro-batches (``scale_grads=False``) for it to average.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch import nn

from ..loss import vocab_parallel_cross_entropy
from ..mesh import Mesh
from ..models.moe import load_balancing_loss, moe_blocks
from .config import check_moe_pipeline


@torch.no_grad()
def average_grads(model: nn.Module, group, n: int) -> None:
    """``g <- (1/n) sum over the DP group`` for every gradient, in one flat all-reduce (used with
    PP: torch 2.13's DDP inside a PipelineStage fails its bucket rebuild with > 1 micro-batch;
    and for a mixture of experts). A parameter no rank has a gradient for (an expert no token of
    the step chose) keeps none, as in one process: the flat buffer carries one flag per
    parameter, ``(P + sum numel,)``."""
    params = list(model.parameters())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    had = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype,
                       device=grads[0].device)                                     # (P,)
    flat = torch.cat([had] + [g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= n
    offset = len(params)
    for i, (p, g) in enumerate(zip(params, grads)):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone() if flat[i] > 0 else None
        offset += g.numel()


class StageRunner:
    """Runs one training step's forward/backward of this rank's stage over its micro-batches."""

    def __init__(self, model: nn.Module, mesh: Mesh, *, micro_batches: int, schedule: str = "1f1b",
                 bf16: bool = False, zero: int = 0) -> None:
        self.model, self.mesh, self.micro_batches = model, mesh, micro_batches
        self.autocast = functools.partial(torch.autocast, mesh.device.type, dtype=torch.bfloat16,
                                          enabled=bf16)
        self.wrapped: nn.Module = model
        self.zero = zero
        self.moe = bool(moe_blocks(model))
        if self.moe:
            check_moe_pipeline(model.config, mesh.pp)
        if mesh.dp > 1 and mesh.pp == 1 and not zero and not self.moe:
            from torch.nn.parallel import DistributedDataParallel as DDP
            import inspect
            # buffers (rope tables, KV indices) are constants: no per-forward broadcast
            quiet = ("forward_sync_buffers" if "forward_sync_buffers" in
                     inspect.signature(DDP.__init__).parameters else "broadcast_buffers")
            self.wrapped = DDP(model, process_group=mesh.dp_group, **{quiet: False},
                               gradient_as_bucket_view=True,
                               device_ids=None if mesh.device.type == "cpu" else [mesh.device])
        self.schedule = None
        if mesh.pp > 1:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
            stage = PipelineStage(self.wrapped, mesh.pp_rank, mesh.pp, mesh.device,
                                  group=mesh.pp_group)
            cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
            self.schedule = cls(stage, n_microbatches=micro_batches, loss_fn=self.loss_fn,
                                scale_grads=not zero)

    def loss_fn(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of vocabulary-parallel logits ``(b, s, V/t)`` against ``(b, s)``,
        plus a mixture of experts' load-balancing loss (module docstring)."""
        head = self.model.lm_head
        loss = vocab_parallel_cross_entropy(logits, target, group=self.mesh.tp_group,
                                            vocab_start=head.start, vocab_size=head.num_embeddings)
        if self.moe:
            share, _ = load_balancing_loss(self.model, group=self.mesh.ep_group)
            loss = loss + self.model.config.router_aux_loss_coef * self.mesh.ep * share
        return loss

    def step(self, ids: torch.Tensor, targets: torch.Tensor) -> float | None:
        """``ids``, ``targets``: ``(A x b, s)``. Returns the mean micro-batch loss on the last
        stage, ``None`` elsewhere. Gradients are left in the parameters (not yet TP-finalised)."""
        ids, targets = ids.to(self.mesh.device), targets.to(self.mesh.device)
        if self.schedule is not None:
            return self._pipeline_step(ids, targets)
        total = 0.0
        for m, (x, y) in enumerate(zip(ids.chunk(self.micro_batches), targets.chunk(self.micro_batches))):
            last = m == self.micro_batches - 1
            sync = self.wrapped.no_sync() if self.wrapped is not self.model and not last \
                else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    loss = self.loss_fn(self.wrapped(x), y)
                (loss / self.micro_batches).backward()
            total += float(loss.detach())
        if self.moe and self.mesh.dp > 1 and not self.zero:
            average_grads(self.model, self.mesh.dp_group, self.mesh.dp)
        return total / self.micro_batches

    def _pipeline_step(self, ids: torch.Tensor, targets: torch.Tensor) -> float | None:
        first, last = self.mesh.pp_rank == 0, self.mesh.pp_rank == self.mesh.pp - 1
        losses: list[torch.Tensor] = []
        with self.autocast():
            if first:
                self.schedule.step(ids)
            elif last:
                self.schedule.step(target=targets, losses=losses)
            else:
                self.schedule.step()
        if self.mesh.dp > 1 and not self.zero:
            average_grads(self.model, self.mesh.dp_group, self.mesh.dp)
        if not last:
            return None
        return float(torch.stack([l.detach().float() for l in losses]).mean())
