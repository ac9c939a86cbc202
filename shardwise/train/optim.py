"""AdamW, the warmup + cosine schedule, and clipping by the true global gradient norm.

The global norm counts every parameter of the unsharded model exactly once::

    ||g||^2 = sum over TP-sharded params (each rank its rows; rows of a KV head replicated on
                 several ranks only on the first holder)
            + sum over TP-replicated params (norm weights, biases: only on tp_rank 0)
            + the tied embedding only on the first pipeline stage (the last holds a copy)

summed over the TP group, then over the PP group. DP replicas hold identical (all-reduced)
gradients, so nothing is summed over DP (under ZeRO each DP rank holds different slices of them
and the sum runs over the whole world: ``zero.py``). :func:`counted_ranges` is the one statement
of which elements count. Clipping: ``g <- g * min(1, max_norm / (||g|| + 1e-6))``
(``torch.nn.utils.clip_grad_norm_``'s formula).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..mesh import Mesh, group_size
from ..layers import finalize_grads
from ..shards import assemble_local, pieces_of, sharded_params


def adamw(decay: list[torch.Tensor], other: list[torch.Tensor], *, lr: float,
          betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on ``decay`` (matrices) only, not on ``other`` (norms, biases)."""
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=1e-8)


def build_optimizer(model: nn.Module, *, lr: float, betas: tuple[float, float],
                    weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters, weight decay on matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    return adamw([p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2],
                 lr=lr, betas=betas, weight_decay=weight_decay)


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


def counted_ranges(model: nn.Module, mesh: Mesh) -> dict[int, list[tuple[int, int]]]:
    """``id(param) -> [(a, b)]``: the flat elements of each local parameter that count in the
    global norm (see the module docstring); ``[]`` for a parameter another rank counts."""
    skip_rows = _excluded_rows(model, mesh.tp_rank)
    copy = tied_copy(model, mesh)
    out: dict[int, list[tuple[int, int]]] = {}
    for p in model.parameters():
        if p is copy or (not pieces_of(p) and mesh.tp_rank != 0):
            out[id(p)] = []  # the first stage / tp_rank 0 counts it
            continue
        per_row = p[0].numel() if p.dim() > 1 else 1
        ranges = [(0, p.numel())]
        for row, n in sorted(skip_rows.get(id(p), [])):
            a, b = row * per_row, (row + n) * per_row
            ranges = [r for lo, hi in ranges for r in ((lo, min(hi, a)), (max(lo, b), hi))
                      if r[0] < r[1]]
        out[id(p)] = ranges
    return out


def squared_norm(grad: torch.Tensor, counted: list[tuple[int, int]], lo: int = 0) -> torch.Tensor:
    """``sum g^2`` over the counted elements of a flat gradient holding elements ``[lo, ...)``."""
    flat, sq = grad.reshape(-1), torch.zeros((), dtype=torch.float64, device=grad.device)
    for a, b in counted:
        i, j = max(a, lo), min(b, lo + flat.numel())
        if i < j:
            sq += flat[i - lo:j - lo].double().pow(2).sum()
    return sq


@torch.no_grad()
def global_grad_norm(model: nn.Module, mesh: Mesh) -> torch.Tensor:
    """The L2 norm of the full model's gradient (see the module docstring); same on every rank."""
    counted = counted_ranges(model, mesh)
    sq = torch.zeros((), dtype=torch.float64, device=mesh.device)
    for p in model.parameters():
        if p.grad is not None:
            sq += squared_norm(p.grad, counted[id(p)])
    for group in (mesh.tp_group, mesh.pp_group):
        if group_size(group) > 1:
            dist.all_reduce(sq, group=group)
    return sq.sqrt().float()


def clip_coefficient(norm: torch.Tensor | float, max_norm: float) -> float:
    """``min(1, max_norm / (norm + 1e-6))`` (1 when clipping is off: ``max_norm`` 0)."""
    return min(1.0, max_norm / (float(norm) + 1e-6)) if max_norm > 0 else 1.0


EXP = ("exp_avg", "exp_avg_sq")


class MeshAdamW:
    """What the loop drives, for :class:`ReplicatedAdamW` and
    :class:`~shardwise.train.zero.ZeroAdamW`: ``zero_grad``, ``finish_grads`` (TP completion,
    tied-embedding sum, and the DP reduction where the optimizer owns it), ``grad_norm``,
    ``clip``, ``step``; ``state_items`` / ``load_state`` / ``writes_state`` for checkpoints."""

    opt: torch.optim.AdamW
    zero = 0

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    @property
    def opt_step(self) -> float:
        """AdamW's step count (the same for every parameter)."""
        return max((float(st["step"]) for st in self.opt.state.values() if "step" in st),
                   default=0.0)


class ReplicatedAdamW(MeshAdamW):
    """AdamW over the full (TP-local) parameters of every data-parallel replica: plain DDP."""

    def __init__(self, model: nn.Module, mesh: Mesh, *, lr: float, betas: tuple[float, float],
                 weight_decay: float) -> None:
        self.model, self.mesh = model, mesh
        self.opt = build_optimizer(model, lr=lr, betas=betas, weight_decay=weight_decay)
        self.emb_group = embedding_groups(mesh)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def finish_grads(self) -> None:
        finalize_grads(self.model, self.mesh.tp_group)
        sync_tied_embedding(self.model, self.mesh, self.emb_group)

    def grad_norm(self) -> torch.Tensor:
        return global_grad_norm(self.model, self.mesh)

    @torch.no_grad()
    def clip(self, coef: float) -> None:
        if coef < 1.0:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)

    def step(self) -> None:
        self.opt.step()

    def writes_state(self) -> bool:
        """Whether this rank writes optimizer state to checkpoints (DP replicas hold copies)."""
        return self.mesh.dp_rank == 0

    def state_items(self):
        """``(kind, param path, param, flat range or None, tensor)`` of every AdamW moment."""
        for path, p, _ in sharded_params(self.model):
            st = self.opt.state.get(p, {})
            for k in EXP:
                if k in st:
                    yield k, path, p, None, st[k]

    @torch.no_grad()
    def load_state(self, reader, step: float) -> None:
        """AdamW moments from ``reader(kind)`` (a ReadFn over full tensors), at any layout."""
        for path, p, _ in sharded_params(self.model):
            self.opt.state[p] = {"step": torch.tensor(step), **{
                k: assemble_local(path, p, reader(k)).to(p.dtype).clone() for k in EXP}}


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
