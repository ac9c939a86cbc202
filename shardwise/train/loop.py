"""The training loop one rank runs (under :func:`shardwise.launch.spawn` or torchrun).

Per step ``k`` (0-based; logged as ``k + 1``)::

    lr_k = warmup + cosine (optim.lr_at)
    forward/backward of A micro-batches         StageRunner (pipelining schedule, DDP over DP;
                                                under ZeRO-2 the buckets reduce-scatter here)
    opt.finish_grads()                          SP-partial norm grads, replicated KV-head grads,
                                                tied-embedding sum (first + last stage); ZeRO:
                                                the remaining reduce-scatters
    clip by the global norm (each parameter once across TP, PP, DP)
    AdamW step                                  ZeRO: on this rank's shard, then all-gather
    loss = mean over DP replicas of the last stage's mean micro-batch loss

and a checkpoint every ``save_every`` steps and at the end.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from ..checkpoint.source import ModelSource, build_model
from ..comm import Ledger
from ..failure import phase
from ..mesh import Mesh
from ..random import seed_everything
from .ckpt import load_checkpoint, save_checkpoint
from .config import TrainConfig, stage_layers
from .data import PackedData
from .optim import ReplicatedAdamW, clip_coefficient, lr_at
from .pipeline import StageRunner
from .signals import Reporter, flops_per_token, gather_rank_stats, peak_memory_bytes


def _mean_loss(local: float | None, mesh: Mesh) -> float:
    """The last stage's loss, averaged over DP, on every rank (one all-reduce over the world)."""
    t = torch.tensor([local or 0.0], dtype=torch.float64, device=mesh.device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return float(t) / (mesh.tp * mesh.dp)


def make_optimizer(model, mesh: Mesh, cfg: TrainConfig):
    """Plain AdamW under DDP, or ZeRO-1/2 over the DP group."""
    kw = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if not cfg.zero:
        return ReplicatedAdamW(model, mesh, **kw)
    from .zero import ZeroAdamW
    unaveraged = cfg.accumulation if cfg.pp > 1 else 1  # the pp=1 loop divides each loss by A
    return ZeroAdamW(model, mesh, stage=cfg.zero, grad_scale=1.0 / (cfg.dp * unaveraged), **kw)


def train_worker(cfg: TrainConfig, source: ModelSource, rows: torch.Tensor) -> dict[str, Any]:
    """Train on this rank; returns ``{"losses": [...], "steps": [...], "records": [...]}`` (the
    same losses on every rank; records only on rank 0)."""
    with phase("start"):
        mesh = Mesh.init(cfg.tp, cfg.pp, cfg.dp)
    out = train_on_mesh(cfg, source, rows, mesh)
    # only after success: a rank that failed must not wait here for peers that never come
    # (its error is already with the launcher, which ends the run)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        from ..mesh import forget_groups
        forget_groups()
    return out


def train_on_mesh(cfg: TrainConfig, source: ModelSource, rows: torch.Tensor, mesh: Mesh
                  ) -> dict[str, Any]:
    """Train on an existing mesh (several runs can share one process group: tests)."""
    tracker = seed_everything(mesh, cfg.seed)
    mc = source.config
    model = build_model(source, group=mesh.tp_group, sequence_parallel=cfg.sequence_parallel,
                        layers=stage_layers(mc.num_hidden_layers, cfg.pp, mesh.pp_rank),
                        device=mesh.device, seed=cfg.seed)
    with phase("build"):
        opt = make_optimizer(model, mesh, cfg)
    start = 0
    if cfg.resume:
        with phase("load checkpoint"):
            meta = load_checkpoint(cfg.resume, model, opt, mesh)
        start = meta["step"]
        if meta.get("rng") is not None:
            tracker.load_state_dict(meta["rng"])
    with phase("build"):
        model.set_recompute(cfg.recompute)
        runner = StageRunner(model, mesh, micro_batches=cfg.accumulation, schedule=cfg.schedule,
                             bf16=cfg.bf16, zero=cfg.zero)
    data = PackedData(rows, cfg.seed)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rep = Reporter(cfg.out_dir, active=mesh.rank == 0, progress=cfg.progress, total=cfg.steps,
                   start=start, flops_token=flops_per_token(mc, cfg.seq_len),
                   peak_tflops=cfg.peak_tflops, world=mesh.world_size,
                   tokens_per_step=cfg.global_batch * cfg.seq_len)
    out: dict[str, Any] = {"losses": [], "steps": [], "records": []}
    meta_base = {"model": source.name, "seed": cfg.seed, "global_batch": cfg.global_batch,
                 "seq_len": cfg.seq_len, "recompute": cfg.recompute}
    for k in range(start, cfg.steps):
        lr = lr_at(k, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, total=cfg.steps)
        opt.set_lr(lr)
        ids, targets = data.batch(k, global_batch=cfg.global_batch, dp=cfg.dp, dp_rank=mesh.dp_rank)
        with phase(f"step {k + 1}"):  # forward, backward, pipeline send/recv, optimizer
            t0 = time.perf_counter()
            with Ledger() as ledger:
                opt.zero_grad()
                local = runner.step(ids, targets)
                opt.finish_grads()
                norm = opt.grad_norm()
                coef = clip_coefficient(norm, cfg.max_grad_norm)
                opt.clip(coef)
                opt.step()
                loss = _mean_loss(local, mesh)
            seconds = time.perf_counter() - t0
            stats = gather_rank_stats([ledger.seconds, seconds, peak_memory_bytes(mesh.device),
                                       param_bytes], mesh.device)
            rec = rep.step(k + 1, loss=loss, lr=lr, grad_norm=float(norm), clip=coef,
                           seconds=seconds, per_rank=stats,
                           extra={"collectives": ledger.counts()} if mesh.rank == 0 else None)
        out["losses"].append(loss)
        out["steps"].append(k + 1)
        if mesh.rank == 0:
            out["records"].append(rec)
        done = k + 1 == cfg.steps
        if cfg.save and ((cfg.save_every and (k + 1) % cfg.save_every == 0) or done):
            with phase(f"save step {k + 1}"):
                save_checkpoint(f"{cfg.out_dir}/checkpoints", k + 1, model, opt, mesh,
                                meta=meta_base, config=mc.to_hf(), tokenizer=source.tokenizer,
                                rng=tracker.state_dict(), crash=cfg.crash_during_save_at == k + 1)
    plot = rep.close()
    out["plot"] = str(plot) if plot else None
    return out
