"""The attention math every path shares: training, the contiguous cache, the paged cache.

For one layer, with queries at positions ``p_i`` and keys at positions ``p_j``::

    scores_ij = scale * q_i . k_j                              (b, heads, s, L)
    scores_ij = c * tanh(scores_ij / c)                        soft-capping, when c is set
    scores_ij = -inf  unless  p_i - W < p_j <= p_i             causal, within the window W
    out_i     = sum_j softmax_j(scores_ij) v_j

``scale`` is ``head_dim^-1/2`` (Gemma: ``query_pre_attn_scalar^-1/2``); ``W`` is the sliding
window (``None``: every earlier key), counted as transformers counts it: a query sees itself and
the ``W - 1`` keys before it. Without soft-capping this is one
``torch.nn.functional.scaled_dot_product_attention`` call (its fused kernels, GQA without copying
KV heads). Soft-capping has no SDPA form -- the tanh sits between the product and the softmax --
so it runs as two matmuls with the ``(b, heads, s, L)`` scores in memory and a float32 softmax
(transformers' eager path, which Gemma 2 uses for the same reason).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttnParams:
    """What one layer's attention needs besides q, k and v (fixed when the layer is built)."""

    scale: float
    softcap: float | None = None
    window: int | None = None


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean mask ``(..., s, L)``: query ``i`` may read key ``j`` (causal, within the window).

    ``q_pos``: (..., s) and ``k_pos``: (..., L) absolute positions."""
    gap = q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)                     # (..., s, L)
    mask = gap >= 0
    return mask if window is None else mask & (gap < window)


def first_visible(pos: int, window: int | None) -> int:
    """The first key position a query at ``pos`` reads (0 without a window)."""
    return 0 if window is None else max(0, pos - window + 1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttnParams, *,
              mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """``q`` (b, hq, s, d); ``k``, ``v`` (b, hk, L, d) with ``hq = g x hk``: query head ``h``
    reads KV head ``h // g``. ``mask``: boolean, broadcastable to (b, hq, s, L), True = read;
    ``causal``: queries and keys are the same positions (no mask needed). -> (b, hq, s, d)."""
    g = q.shape[1] // k.shape[1]
    if params.softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              is_causal=causal and mask is None,
                                              scale=params.scale, enable_gqa=g > 1)
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (b, hq, L, d)
    s, L = q.shape[2], k.shape[2]
    if s <= QUERY_BLOCK:
        if causal and mask is None:
            mask = torch.ones(s, L, dtype=torch.bool, device=q.device).tril(L - s)
        return _softcapped(q, k, v, params, mask)
    outs = []  # query blocks: bounded scores; causal blocks skip the keys after their last query
    for i0 in range(0, s, QUERY_BLOCK):
        i1 = min(s, i0 + QUERY_BLOCK)
        end = L - s + i1 if causal and mask is None else L
        if causal and mask is None:
            m = torch.ones(i1 - i0, end, dtype=torch.bool, device=q.device).tril(end - (i1 - i0))
        else:
            m = None if mask is None else mask if mask.shape[-2] == 1 else mask[..., i0:i1, :]
        outs.append(_softcapped(q[:, :, i0:i1], k[:, :, :end], v[:, :, :end], params, m))
    return torch.cat(outs, dim=2)                                           # (b, hq, s, d)


QUERY_BLOCK = 512
"""Soft-capped attention handles at most this many queries at once: the scores in memory are
``(b, heads, 512, L)``, and a causal block reads only the keys up to its last query."""


def _softcapped(q, k, v, params: AttnParams, mask: torch.Tensor | None) -> torch.Tensor:
    """``softmax(c tanh(scale q k^T / c) masked) v`` for q (b, h, s, d), k, v (b, h, L, d)."""
    c = params.softcap
    x = torch.matmul(q * (params.scale / c), k.transpose(-1, -2))           # (b, h, s, L)
    if torch.is_grad_enabled() and x.requires_grad:
        x = torch.tanh(x) * c
        if mask is not None:
            x = x.masked_fill(~mask, float("-inf"))
    else:  # inference: one score matrix in memory, updated in place
        x.tanh_().mul_(c)
        if mask is not None:
            x.masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(x, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)                                           # (b, h, s, d)


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   params: AttnParams) -> torch.Tensor:
    """Queries and keys at the same positions ``0..s-1`` (training, one-shot prefill)."""
    s = q.shape[2]
    if params.window is None or params.window >= s:
        return attention(q, k, v, params, causal=s > 1)
    pos = torch.arange(s, device=q.device)
    return attention(q, k, v, params, mask=visible(pos, pos, params.window))
