"""OLMoE's q/k norm, tensor-parallel: one RMSNorm over all query heads and one over all KV heads.

OLMoE normalises the whole projection ``q = x W_q^T`` (all heads at once) and likewise ``k``, with
a weight of ``heads x head_dim`` (``kv_heads x head_dim``). A rank holds only its heads' columns,
so the mean square needs every rank's part::

    S_q = sum over ranks of sum(q_r^2)        (b, s)   one all-reduce forward (q and k together)
    q_r <- w_q[r] * q_r / sqrt(S_q / (heads x head_dim) + eps)

and backward, the gradient of ``S`` is a sum of every rank's part too: ``comm.sum_partial``
(all-reduce both ways). That is one all-reduce more per attention each way, pinned by the tests.
A KV head held by several ranks (uneven layouts) counts once, on its first holder; the rows of
its ``k_norm`` weight get their gradient summed over the holders (``grad_items``), as its k rows.
The weights are sharded like q and k (pieces of the ``q_norm`` / ``k_norm`` checkpoint tensors).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import comm
from ..layers import _mark
from ..partition import HeadLayout
from ..shards import Piece
from .pieces import qkv_norm_all


class ShardedNorm(nn.Module):
    """This rank's columns ``[start, stop)`` of a norm weight over ``full`` columns."""

    def __init__(self, start: int, stop: int, full: int, eps: float, *, dtype=None,
                 device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(stop - start, dtype=dtype, device=device))
        self.weight.init_fill = 1.0
        _mark(self.weight, [Piece("", 0, start, stop, full)])


def owned_columns(layout: HeadLayout, rank: int, head_dim: int) -> torch.Tensor:
    """(local KV columns,): 1 where this rank is its KV head's first holder, else 0."""
    k0, k1 = layout.kv_range(rank)
    mask = [float(layout.holders(h)[0] == rank) for h in range(k0, k1)]
    return torch.tensor(mask).repeat_interleave(head_dim)


def full_width_qk(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rc
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised (and clipped) q, k, v of ``attn`` (an Attention with ``q_norm``, ``k_norm``,
    ``k_owned``, ``widths``, ``clip``). q (b, s, nq x d); k, v (b, s, nkv x d)."""
    sums = torch.stack([q.float().pow(2).sum(-1),
                        (k.float().pow(2) * attn.k_owned).sum(-1)], dim=-1)      # (b, s, 2)
    sums = comm.sum_partial(sums, attn.group)
    return rc(qkv_norm_all, q, k, v, sums, attn.q_norm.weight, attn.k_norm.weight,
              attn.q_norm.eps, attn.widths, attn.clip)


def grad_items(attn) -> list[tuple[int, torch.Tensor | None]]:
    """For every KV head held by several ranks: its ``k_norm`` weight rows (as ``grad_sync_items``)."""
    items: list[tuple[int, torch.Tensor | None]] = []
    p, d = attn.k_norm.weight, attn.d
    for head in attn.layout.shared_kv_heads():
        view = None
        if 0 <= head - attn.k0 < attn.nkv:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            view = p.grad.narrow(0, (head - attn.k0) * d, d)
        items.append((d, view))
    return items
