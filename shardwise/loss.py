"""Cross-entropy over vocabulary-parallel logits, without gathering them.

Rank r holds logits ``z[..., V_r]`` of its vocabulary rows. With ``m = max_v z_v`` (all-reduce MAX)
and ``Z = sum_v exp(z_v - m)`` (all-reduce SUM, packed with the target logit and the logit sum)::

    nll   = log Z - (z_y - m)
    loss  = (1 - eps) * nll + eps * (log Z - mean_v (z_v - m))      # label smoothing eps
    dz_v  = softmax_v - (1 - eps) * [v == y] - eps / V               # V = real vocabulary size

The smoothing term averages over the whole vocabulary, not the local shard (Megatron-LM issue 737
is that bug). Padded vocabulary rows count nowhere. Forward costs two all-reduces, backward none.
"""
from __future__ import annotations

import torch

from .comm import all_reduce_
from .mesh import ProcessGroup


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, start, vocab, ignore_index, eps):
        n_local = logits.shape[-1]
        valid = max(0, min(n_local, vocab - start))  # real (unpadded) columns held here
        z = logits[..., :valid].float()
        m = z.amax(dim=-1) if valid else z.new_full(z.shape[:-1], float("-inf"))
        all_reduce_(m, group, op="max")
        z = z - m.unsqueeze(-1)
        e = z.exp()
        local_t = target - start
        mine = (local_t >= 0) & (local_t < valid)
        idx = torch.where(mine, local_t, 0).unsqueeze(-1)
        z_y = torch.gather(z, -1, idx).squeeze(-1) * mine
        packed = torch.stack([e.sum(-1), z_y, z.sum(-1)])  # (3, ...)
        all_reduce_(packed, group)
        sum_e, z_y, sum_z = packed
        log_z = sum_e.log()
        loss = (1 - eps) * (log_z - z_y) + eps * (log_z - sum_z / vocab)
        keep = target != ignore_index
        loss = loss * keep
        ctx.save_for_backward(e, sum_e, idx, mine, keep)
        ctx.shape, ctx.valid, ctx.vocab, ctx.eps, ctx.dtype = logits.shape, valid, vocab, eps, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, dloss):
        e, sum_e, idx, mine, keep = ctx.saved_tensors
        g = e / sum_e.unsqueeze(-1)
        g.scatter_add_(-1, idx, -(1 - ctx.eps) * mine.unsqueeze(-1).to(g.dtype))
        if ctx.eps:
            g -= ctx.eps / ctx.vocab
        g *= (dloss * keep).unsqueeze(-1)
        out = torch.zeros(ctx.shape, dtype=ctx.dtype, device=g.device)
        out[..., : ctx.valid] = g.to(ctx.dtype)
        return out, None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *,
                                 group: ProcessGroup | None, vocab_start: int, vocab_size: int,
                                 ignore_index: int = -100, label_smoothing: float = 0.0,
                                 reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of local logits ``(..., V_local)`` (columns ``vocab_start ...``) against
    ``target`` ``(...)``; equals ``F.cross_entropy`` on the gathered logits.

    ``vocab_size`` is the real vocabulary (padded columns beyond it are ignored). ``reduction``:
    ``"mean"`` over non-ignored targets, ``"sum"`` or ``"none"``.
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be within [0, 1]")
    loss = _VocabParallelCE.apply(logits, target, group, vocab_start, vocab_size, ignore_index,
                                  float(label_smoothing))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (target != ignore_index).sum().clamp(min=1)
    raise ValueError(f"reduction={reduction!r}: use 'mean', 'sum' or 'none'")
