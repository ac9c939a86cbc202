"""AdamW, the warmup + cosine schedule, and clipping by the true global gradient norm.

The global norm counts every parameter of the unsharded model exactly once::

    ||g||^2 = sum over TP-sharded params (each rank its rows; rows of a KV head replicated on
                 several ranks only on the first holder)
            + sum over TP-replicated params (norm weights, biases: only on tp_rank 0)
            + the tied embedding only on the first pipeline stage (the last holds a copy)

summed over the TP group, then over the PP group. DP replicas hold identical (all-reduced)
gradients, so nothing is summed over DP. Clipping: ``g <- g * min(1, max_norm / (||g|| + 1e-6))``
(``torch.nn.utils.clip_grad_norm_``'s formula).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..mesh import Mesh, group_size
from ..shards import pieces_of


def build_optimizer(model: nn.Module, *, lr: float, betas: tuple[float, float],
                    weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=1e-8)


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate of 0-based ``step``: linear warmup ``lr (step + 1) / warmup`` for
    ``step < warmup``, then cosine from ``lr`` down to ``min_lr`` at ``step = total - 1``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def _excluded_rows(model: nn.Module, tp_rank: int) -> dict[int, list[tuple[int, int]]]:
    """``id(param) -> [(row, length)]``: rows of replicated KV heads this rank does not own."""
    out: dict[int, list[tuple[int, int]]] = {}
    for m in model.modules():
        layout = getattr(m, "layout", None)
        if layout is None or not hasattr(m, "qkv_proj"):
            continue
        for head in layout.shared_kv_heads():
            if not 0 <= head - m.k0 < m.nkv or layout.holders(head)[0] == tp_rank:
                continue
            for which in (0, 1):  # k, v rows
                row = m.nq * m.d + which * m.nkv * m.d + (head - m.k0) * m.d
                for p in (m.qkv_proj.weight, m.qkv_proj.bias):
                    if p is not None:
                        out.setdefault(id(p), []).append((row, m.d))
    return out


def tied_copy(model: nn.Module, mesh: Mesh) -> nn.Parameter | None:
    """The last stage's copy of a tied embedding under PP (its grad is synced, its norm not counted)."""
    if mesh.pp > 1 and getattr(model, "last", False) and not getattr(model, "first", False) \
            and model.config.tie_word_embeddings:
        return model.model.embed_tokens.weight
    return None


@torch.no_grad()
def global_grad_norm(model: nn.Module, mesh: Mesh) -> torch.Tensor:
    """The L2 norm of the full model's gradient (see the module docstring); same on every rank."""
    skip_rows = _excluded_rows(model, mesh.tp_rank)
    copy = tied_copy(model, mesh)
    sq = torch.zeros((), dtype=torch.float64, device=mesh.device)
    for p in model.parameters():
        if p.grad is None or p is copy:
            continue
        if not pieces_of(p) and mesh.tp_rank != 0:
            continue  # replicated across TP: counted on tp_rank 0
        g = p.grad.double()
        sq += g.pow(2).sum()
        for row, n in skip_rows.get(id(p), []):
            sq -= g.narrow(0, row, n).pow(2).sum()
    for group in (mesh.tp_group, mesh.pp_group):
        if group_size(group) > 1:
            dist.all_reduce(sq, group=group)
    return sq.sqrt().float()


@torch.no_grad()
def clip_(model: nn.Module, norm: torch.Tensor, max_norm: float) -> float:
    """Scale every gradient by ``min(1, max_norm / (norm + 1e-6))``; returns the factor."""
    coef = min(1.0, max_norm / (float(norm) + 1e-6)) if max_norm > 0 else 1.0
    if coef < 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    return coef


def embedding_groups(mesh: Mesh) -> object | None:
    """The group {first stage, last stage} of this rank's (dp, tp) coordinate that shares the tied
    embedding (Megatron's embedding group); created on every rank in the same order."""
    from ..mesh import grid, subgroup
    if mesh.pp == 1:
        return None
    g = grid(mesh.tp, mesh.pp, mesh.dp)
    mine = None
    for d in range(mesh.dp):
        for t in range(mesh.tp):
            ranks = [int(g[0, d, t]), int(g[-1, d, t])]
            group = subgroup(ranks)
            if mesh.rank in ranks:
                mine = group
    return mine


@torch.no_grad()
def sync_tied_embedding(model: nn.Module, mesh: Mesh, group) -> None:
    """Sum the tied embedding's gradient over the first and last stage (both hold the weight)."""
    if group is None or not model.config.tie_word_embeddings:
        return
    emb = model.model.embed_tokens
    if emb is None:
        return
    if emb.weight.grad is None:
        emb.weight.grad = torch.zeros_like(emb.weight)
    dist.all_reduce(emb.weight.grad, group=group)
