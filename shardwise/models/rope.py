"""Rotary position embeddings: inverse frequencies for every supported rope type, and rotation.

Frequencies of a rotary dimension ``r`` (``head_dim x partial_rotary_factor``) and base
``theta``: ``inv_i = theta^(-2i / r)`` for ``i < r/2``, then by ``rope_scaling``:

* ``linear``: ``inv_i / factor``;
* ``llama3``: long wavelengths divided by ``factor``, short ones kept, a smooth blend between
  (Meta's Llama 3.1 rule);
* ``longrope`` (Phi-3, Phi-4-mini): ``inv_i / short_factor_i`` while the sequence is at most
  ``original_max_position_embeddings`` long, ``inv_i / long_factor_i`` beyond, and cos and sin
  scaled by ``sqrt(1 + ln(s) / ln(original))`` with ``s = max_position_embeddings /
  original`` (the paper's attention factor, unless the config gives ``attention_factor``).
  As in transformers, a sequence uses one set for all its tokens: the long one once it is
  longer than the original context. When a sequence grows past it, the keys cached with the
  short set are recomputed with the long one (transformers drops its cache there; the
  contiguous cache and the serving scheduler re-feed the sequence).

Rotation pairs dimension ``j`` with ``j + r/2`` (Hugging Face's rotate-half layout) within the
first ``r`` dimensions of a head; the rest pass through unchanged.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .. import kernels
from .config import LlamaConfig


def inverse_frequencies(dim: int, theta: float, scaling: Mapping[str, Any] | None = None, *,
                        long: bool = False) -> torch.Tensor:
    """``(dim / 2,)`` float32 inverse frequencies; ``long`` picks longrope's long factors."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    kind = None if scaling is None else scaling["rope_type"]
    if kind is None:
        return inv.float()
    if kind == "linear":
        return (inv / scaling["factor"]).float()
    if kind == "longrope":
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float64)
        return (inv / ext).float()
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)  # long waves: divide
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (wavelen <= old / lo) & (wavelen >= old / hi)  # in between: interpolate
    return torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled).float()


def attention_factor(cfg: LlamaConfig) -> float:
    """The factor on cos and sin (longrope's; 1 otherwise)."""
    rs = cfg.rope_scaling
    if rs is None or rs["rope_type"] != "longrope":
        return 1.0
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    original = rs["original_max_position_embeddings"]
    factor = rs.get("factor") or cfg.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_tables(cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """The inverse-frequency buffers a model needs: ``inv_freq`` always (full-attention layers,
    longrope's short set), ``inv_freq_long`` for longrope, ``inv_freq_local`` for window layers
    with a base of their own (Gemma 3)."""
    r, rs = cfg.rotary_dim, cfg.rope_scaling
    out = {"inv_freq": inverse_frequencies(r, cfg.rope_theta, rs)}
    if rs is not None and rs["rope_type"] == "longrope":
        out["inv_freq_long"] = inverse_frequencies(r, cfg.rope_theta, rs, long=True)
    if cfg.rope_local_theta is not None:
        out["inv_freq_local"] = inverse_frequencies(r, cfg.rope_local_theta)
    return out


def rope_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """The full-attention layers' inverse frequencies (short ones for longrope)."""
    return inverse_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
            scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (b, 1, s, r) for positions (b, s); ``inv_freq`` (r/2,) or per token
    (b, s|1, r/2)."""
    ang = positions.to(inv_freq.dtype).unsqueeze(-1) * inv_freq    # (b, s, r/2)
    ang = torch.cat((ang, ang), dim=-1).unsqueeze(1)               # (b, 1, s, r)
    cos, sin = ang.cos(), ang.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def _native_shapes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether ``shardwise::rope`` takes these: x (b, heads, s, d) with unit stride in d, cos
    and sin (b or 1, 1, s, d) in x's dtype."""
    return x.dim() == 4 and x.stride(-1) == 1 and cos.dtype == sin.dtype == x.dtype and \
        cos.shape == sin.shape and cos.dim() == 4 and cos.shape[1] == 1 and \
        cos.shape[0] in (1, x.shape[0]) and cos.shape[2:] == x.shape[2:]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x_j, x_{j+r/2})`` of the first ``r = cos.shape[-1]`` dimensions.
    x: (b, heads, s, d). In eager CPU inference one native pass
    (:func:`shardwise.kernels.native_pieces`), laid out (b, s, heads, d)."""
    r = cos.shape[-1]
    if r == x.shape[-1] and kernels.native_pieces(x) and _native_shapes(x, cos, sin):
        return torch.ops.shardwise.rope(x, cos, sin)
    if r == x.shape[-1]:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot.chunk(2, dim=-1)
    return torch.cat((rot * cos + torch.cat((-x2, x1), dim=-1) * sin, rest), dim=-1)
