"""The element-wise pieces a decoder layer is made of: norms, the gated activation, q/k norms
with rope, the head merge. Each is a plain function of tensors that stay stored anyway, so that
selective recomputation (:mod:`.recompute`) can run it again in backward instead of keeping its
output; every family's variant (the norm's ``1 + w``, GeGLU, q/k norms) goes through the same
functions.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .. import kernels
from .rope import apply_rope

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def compute_dtype(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the dtype autocast would compute in (itself without autocast): a recomputed
    piece hands the next matmul what it would have cast and saved anyway."""
    kind = t.device.type
    if torch.is_autocast_enabled(kind) and t.is_floating_point():
        return t.to(torch.get_autocast_dtype(kind))
    return t


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             offset: float = 0.0) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last dimension, in fp32, times ``weight`` after the
    cast back to x's dtype (Llama), or times ``offset + weight`` before it (Gemma, offset 1).
    In eager CPU inference one native pass (:func:`shardwise.kernels.native_pieces`)."""
    if weight.dtype == x.dtype and kernels.native_pieces(x):
        return torch.ops.shardwise.rms_norm(x, weight, eps, offset)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (xf * (offset + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


def norm_for_matmul(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    offset: float = 0.0) -> torch.Tensor:
    return compute_dtype(rms_norm(x, weight, eps, offset))


def glu(gate_up: torch.Tensor, local: int, act: Callable) -> torch.Tensor:
    """``act(gate) * up`` of a fused (..., 2 x local) gate/up output (SiLU in eager CPU
    inference: one native pass, :func:`shardwise.kernels.native_pieces`)."""
    if act is F.silu and kernels.native_pieces(gate_up):
        return torch.ops.shardwise.silu_mul(gate_up, local)
    gate, up = gate_up.split(local, dim=-1)
    return act(gate) * up


def rope_qk(q, k, cos, sin, q_weight=None, k_weight=None, eps: float = 0.0,
            offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k when their weights are given (Qwen3, Gemma 3), then rope."""
    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps, offset), rms_norm(k, k_weight, eps, offset)
    return compute_dtype(apply_rope(q, cos, sin)), compute_dtype(apply_rope(k, cos, sin))


def rope_qk_expand(q, k, v, cos, sin, kv_index, *norms) -> tuple[torch.Tensor, ...]:
    """:func:`rope_qk`, then K and V expanded to one head per local query head."""
    q, k = rope_qk(q, k, cos, sin, *norms)
    return q, k.index_select(1, kv_index), compute_dtype(v).index_select(1, kv_index)


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(b, heads, s, d) -> (b, s, heads x d): a view when attention wrote its output in
    (b, s, heads, d) order, as the flash kernels do (CPU included)."""
    b, n, s, d = out.shape
    return out.transpose(1, 2).reshape(b, s, n * d)      # (b, s, heads x d)


def qkv_norm_all(q, k, v, sums, q_weight, k_weight, eps: float, widths: tuple[int, int],
                 clip: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLMoE's q and k RMSNorm over all heads of each, from the full-width sums of squares
    ``sums`` (b, s, 2) fp32 (:mod:`.qk_norm`), then q, k, v clamped to +-``clip``. q (b, s, nq x d),
    k and v (b, s, nkv x d): this rank's columns; ``widths``: the full widths of q and k."""
    def norm(x, total, w):
        return (x.float() * torch.rsqrt(total / w + eps)).to(x.dtype)   # (b, s, local)
    q = norm(q, sums[..., :1], widths[0]) * q_weight
    k = norm(k, sums[..., 1:], widths[1]) * k_weight
    if clip is not None:
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    return q, k, v
