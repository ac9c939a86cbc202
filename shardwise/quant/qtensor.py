"""A weight quantized along its input dimension, in groups: the canonical form.

A weight ``W`` of shape ``(n, k)`` (``y = x W^T``: n outputs, k inputs) is stored as integers
``q`` and, per row and per group of ``group`` consecutive columns, a scale (and for int4 a zero
point)::

    int8   W[i, j] = s[i, g(j)] * q[i, j]                      q in [-127, 127] (symmetric)
    int4   W[i, j] = s[i, g(j)] * (q[i, j] - 8) + z[i, g(j)]   q in [0, 15]     (asymmetric)

    g(j) = (j + offset) // group

int4's form is torch's int4 kernel's: ``(q - 8) * s + z``. GGUF's Q4_0 (``d * (q - 8)``) is
``s = d, z = 0``; Q4_1 (``d * q + m``) is ``s = d, z = m + 8 d``; Q8_0 (``d * q``) is int8 with
groups of 32. Per-channel int8 is one group spanning the row (``group >= k``).

Groups belong to the *full* tensor: a slice of columns ``[a, b)`` keeps the full tensor's groups,
clipped (``offset = a mod group``: the columns of its first group that lie before the slice).
So every rank's slice holds exactly the unsharded tensor's values, whatever its boundaries; how
a rank then runs its slice on a kernel with uniform groups is :mod:`shardwise.quant.grid`'s job.

Scales and zero points are kept in fp32 here; a runtime form rounds them to the activation dtype.
``q`` is one value per byte (int8, or uint8 for int4); files hold int4 two per byte
(:func:`pack_nibbles`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .config import METHODS


@dataclass
class QTensor:
    """Rows x columns of a quantized weight (see the module docstring for the formulas).

    ``q``: (n, k) int8 (int8) or uint8 in [0, 15] (int4); ``scale``, ``zero``: (n, groups)
    fp32 (``zero`` is None for int8); ``group``: columns per group of the full tensor;
    ``offset``: the columns of the first group that precede column 0 of this slice.
    """

    method: str
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group: int
    offset: int = 0
    notes: list[str] = field(default_factory=list)  # what the reader did (for the load report)
    owned: bool = False  # q was made for this tensor alone: a runtime form may reuse its memory

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization {self.method!r}")
        n, k = self.q.shape
        want = (n, n_groups(k, self.group, self.offset))
        if tuple(self.scale.shape) != want or (self.zero is not None
                                               and tuple(self.zero.shape) != want):
            raise ValueError(f"{self.method} tensor ({n}, {k}) in groups of {self.group} "
                             f"(offset {self.offset}) needs scales {want}, got "
                             f"{tuple(self.scale.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def group_index(self) -> torch.Tensor:
        """(k,) the group of each column."""
        return (torch.arange(self.q.shape[1]) + self.offset) // self.group

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(n, k) float values, computed in fp32 and returned in ``dtype``."""
        idx = self.group_index()
        s = self.scale[:, idx]                                  # (n, k)
        if self.method == "int8":
            return (self.q.float() * s).to(dtype)
        return ((self.q.float() - 8) * s + self.zero[:, idx]).to(dtype)

    def rows(self, start: int, stop: int) -> "QTensor":
        z = None if self.zero is None else self.zero[start:stop]
        return replace(self, q=self.q[start:stop], scale=self.scale[start:stop], zero=z,
                       notes=list(self.notes), owned=False)

    def cols(self, start: int, stop: int) -> "QTensor":
        """Columns ``[start, stop)``: the groups they touch, clipped (no value changes)."""
        a = (self.offset + start) // self.group
        b = -(-(self.offset + stop) // self.group)
        z = None if self.zero is None else self.zero[:, a:b]
        return replace(self, q=self.q[:, start:stop], scale=self.scale[:, a:b], zero=z,
                       offset=(self.offset + start) % self.group, notes=list(self.notes),
                       owned=False)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.zero)
                   if t is not None)


def n_groups(k: int, group: int, offset: int = 0) -> int:
    """Groups touched by ``k`` columns whose first group starts ``offset`` columns earlier."""
    return -(-(offset + k) // group) if k else 0


def stack_rows(parts: list[QTensor], pads: list[int] | None = None) -> QTensor:
    """Stack row blocks with the same columns and grid (fused QKV, gate/up, vocabulary rows),
    ``pads[i]`` zero rows (scale 0, zero point 0: value 0) after part ``i``, into one
    preallocated tensor (a load's peak memory is the result plus one part, not twice the
    result). One part without padding is returned as it is."""
    pads = pads or [0] * len(parts)
    first = parts[0]
    for p in parts[1:]:
        if (p.method, p.group, p.offset, p.q.shape[1]) != \
                (first.method, first.group, first.offset, first.q.shape[1]):
            raise ValueError("row blocks of one fused weight must share method, columns and "
                             "groups")
    if len(parts) == 1 and not pads[0]:
        return first
    rows = sum(p.q.shape[0] + pad for p, pad in zip(parts, pads))
    new = lambda t, fill: None if t is None else t.new_full(  # noqa: E731
        (rows,) + tuple(t.shape[1:]), fill)
    out = replace(first, q=new(first.q, 0 if first.method == "int8" else 8),
                  scale=new(first.scale, 0), zero=new(first.zero, 0),
                  notes=[n for p in parts for n in p.notes], owned=True)
    at = 0
    for p, pad in zip(parts, pads):
        n = p.q.shape[0]
        out.q[at:at + n], out.scale[at:at + n] = p.q, p.scale
        if out.zero is not None:
            out.zero[at:at + n] = p.zero
        at += n + pad
    return out


def _grouped(w: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """(n, k) -> (n, groups, group) zero-padded on the right; and the padding."""
    n, k = w.shape
    pad = (-k) % group
    if pad:
        w = torch.cat([w, w.new_zeros(n, pad)], dim=1)
    return w.view(n, -1, group), pad                          # (n, groups, group)


def quantize(w: torch.Tensor, method: str, *, group: int | None = None,
             search: bool = False) -> QTensor:
    """Round-to-nearest quantization of a full tensor (or of columns starting on a group
    boundary) ``w`` (n, k), computed in fp32.

    int8: symmetric, ``s = max|w| / 127`` per group (default: per row). int4: asymmetric min-max
    per group of ``group`` columns: ``s = (max - min) / 15``, ``q = round((w - min) / s)``,
    ``z = min + 8 s`` (so that ``(q - 8) s + z = q s + min``). A constant group gets ``s = 0``.
    ``search`` (int4): per group, the scale and minimum of least squared error instead
    (:func:`_fit_int4`); min-max stays the bound a re-quantized straddle keeps.
    """
    w = w.float()
    n, k = w.shape
    if method == "int8":
        group = k if group is None else group
        g, pad = _grouped(w, group)                              # (n, groups, group)
        s = g.abs().amax(-1) / 127                                # (n, groups)
        inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
        q = torch.round(g * inv.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        return QTensor("int8", q.view(n, -1)[:, :k], s, None, group, owned=not pad)
    if method != "int4" or group is None:
        raise ValueError(f"quantize: {method!r} (int4 needs a group size)")
    g, pad = _grouped(w, group)
    if pad:  # the padding must not widen the last group's range: repeat its first value
        g[:, -1, group - pad:] = g[:, -1, :1]
    lo, hi = g.amin(-1), g.amax(-1)                               # (n, groups)
    s = (hi - lo) / 15
    if search:
        s, lo = _fit_int4(g, lo, s)
    inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
    q = torch.round((g - lo.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp_(0, 15).to(torch.uint8)
    return QTensor("int4", q.view(n, -1)[:, :k], s, lo + 8 * s, group, owned=not pad)


SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # candidate fractions of a group's range
REFITS = 2


def _fit_int4(g: torch.Tensor, lo: torch.Tensor, s: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of ``g`` (n, groups, group): the step ``s`` and minimum ``m`` of the 16 levels
    ``m + q s`` with the least squared error, searched as llama.cpp's k-quants do in spirit:
    from min-max shrunk to each fraction in :data:`SHRINK` of the range (clipping the tails), the
    levels rounded, then ``(s, m)`` refitted by least squares on those levels (:data:`REFITS`
    times); the best candidate per group wins (min-max itself is a candidate, so the error never
    grows). Chunked over rows to bound the memory."""
    best_s, best_m = s.clone(), lo.clone()
    for r in range(0, g.shape[0], 1024):
        x = g[r:r + 1024]
        mid = (lo[r:r + 1024] + s[r:r + 1024] * 7.5).unsqueeze(-1)
        rng = (s[r:r + 1024] * 15).unsqueeze(-1)
        best = None
        for t in SHRINK:
            m, st = mid - rng * t / 2, rng * t / 15                   # (rows, groups, 1)
            for _ in range(REFITS + 1):
                inv = torch.where(st > 0, 1 / st, torch.zeros_like(st))
                q = torch.round((x - m) * inv).clamp_(0, 15)
                err = ((q * st + m - x) ** 2).sum(-1)                 # (rows, groups)
                if best is None:
                    best = err
                better = err < best
                best = torch.where(better, err, best)
                best_s[r:r + 1024] = torch.where(better, st[..., 0], best_s[r:r + 1024])
                best_m[r:r + 1024] = torch.where(better, m[..., 0], best_m[r:r + 1024])
                # least squares of x on q: st = cov(q, x) / var(q), m = mean(x) - st mean(q)
                qm, xm = q.mean(-1, keepdim=True), x.mean(-1, keepdim=True)
                var = ((q - qm) ** 2).sum(-1, keepdim=True)
                cov = ((q - qm) * (x - xm)).sum(-1, keepdim=True)
                fit = torch.where(var > 0, cov / var.clamp_min(1e-30), st)
                st = torch.where(fit > 0, fit, st)
                m = xm - st * qm
    return best_s, best_m


def quantize_cols(w: torch.Tensor, method: str, group: int, start: int) -> QTensor:
    """Quantize columns ``[start, start + k)`` of a full tensor on the full tensor's grid:
    ``w`` must hold whole groups (start a multiple of ``group``); see :func:`group_span`."""
    if start % group:
        raise ValueError(f"columns from {start} do not start on a group of {group}")
    return quantize(w, method, group=group)


def group_span(start: int, stop: int, group: int, k: int) -> tuple[int, int]:
    """The columns of the whole groups that ``[start, stop)`` touches, clipped to ``k``."""
    return (start // group) * group, min(k, -(-stop // group) * group)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, k) uint8 values in [0, 15] -> (n, ceil(k/2)) bytes, column 2j in the low nibble."""
    if q.shape[1] % 2:
        q = torch.cat([q, q.new_zeros(q.shape[0], 1)], dim=1)
    pairs = q.view(q.shape[0], -1, 2)                           # (n, k/2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_nibbles(b: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: (n, ceil(k/2)) bytes -> (n, k) values."""
    q = torch.stack([b & 0xF, b >> 4], dim=-1)                  # (n, k/2, 2)
    return q.view(b.shape[0], -1)[:, :k]
