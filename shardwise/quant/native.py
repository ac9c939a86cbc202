"""The native runtime form: int8 or int4 in uniform groups on ``shardwise::qlinear``
(``shardwise/kernels/qlinear.cpp``), laid out in its 16-row tiles; and :func:`native`, which
picks it where it fits (see :mod:`.kernels` for every form and :func:`.kernels.prepare`)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .grid import int4_grid
from .kernels import QuantizedWeight, regrid
from .qtensor import QTensor


def tiled(t: torch.Tensor) -> torch.Tensor:
    """(n, c) -> (n/16, c, 16): tiles of 16 rows, column-major inside (``shardwise::qlinear``'s
    layout: one load gives a column's 16 rows)."""
    n, c = t.shape
    return t.view(n // 16, 16, c).transpose(1, 2).contiguous()


def tiled_(t: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """:func:`tiled` in ``t``'s own memory (``t`` contiguous, owned by the caller): each 16-row
    tile occupies the same bytes in both layouts, so chunks of tiles are transposed in place
    through a chunk-sized buffer (a big weight is not held twice while it is laid out)."""
    n, c = t.shape
    flat = t.view(-1)
    for r in range(0, n, rows):
        r1 = min(n, r + rows)
        block = t[r:r1].reshape(-1, 16, c).transpose(1, 2).reshape(-1)  # a copy of the chunk
        flat[r * c:r1 * c] = block
    return t.view(n // 16, c, 16)


def untiled(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`tiled`: (n/16, c, 16) -> (n, c)."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])


# bit offset of column c (0..7) of an 8-column block in ``shardwise::qlinear``'s int4 words:
# column pairs (2p, 2p + 1) at bits 4p and 16 + 4p (a shift and mask gives a pair in 16-bit halves)
_SHIFTS = torch.tensor([0, 16, 4, 20, 8, 24, 12, 28], dtype=torch.int32)


def pack_words(q: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """(n, k) int4 values -> (n, k/8) int32 words, 8 columns each (offsets: ``_SHIFTS``), in
    chunks of rows (the int32 transient stays small)."""
    n, k = q.shape
    out = torch.empty(n, k // 8, dtype=torch.int32)
    for r in range(0, n, rows):
        v = q[r:r + rows].to(torch.int32).view(-1, k // 8, 8)
        out[r:r + rows] = (v << _SHIFTS).sum(-1, dtype=torch.int32)  # disjoint bits: an OR
    return out


def unpack_words(w: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_words`: (..., k/8) int32 -> (..., k) uint8 values."""
    return ((w.unsqueeze(-1) >> _SHIFTS.to(w.device)) & 0xF).flatten(-2).to(torch.uint8)


NATIVE_ROWS = {4: 512, 8: 128}
"""Rows up to which ``shardwise::qlinear`` (one pass over the weight per 4 rows) beats
dequantize-then-GEMM, by bits (measured on SmolLM2's 30 layers, bf16: int4 at 128 rows 120 ms
vs 670 ms, int8 213 vs 254 ms; the GEMM's share grows with the rows)."""


class Native(QuantizedWeight):
    """int8 or int4 in uniform groups of ``group`` columns on ``shardwise::qlinear`` (rows a
    multiple of 16), stored in its tiles; scales and zero points
    (:class:`~shardwise.quant.qtensor.QTensor`'s formulas) in the activation dtype."""

    def __init__(self, method: str, q: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor | None, group: int, dtype: torch.dtype, device, *,
                 consume: bool = False) -> None:
        super().__init__(*q.shape, dtype)
        self.method, self.group, self.bits = method, group, 8 if method == "int8" else 4
        self.form = f"{method}-native"
        if method == "int4":
            q = tiled_(pack_words(q))  # a fresh tensor: laid out in place
        else:  # ``consume``: q is this weight's alone (QTensor.owned), lay it out in place
            q = tiled_(q) if consume and q.is_contiguous() and q.device.type == "cpu" else tiled(q)
        self.register_buffer("q", q.to(device))
        self.register_buffer("scale", tiled(scale.to(dtype)).to(device))
        self.register_buffer("zero", None if zero is None else tiled(zero.to(dtype)).to(device))

    def _mm(self, x2):
        if x2.shape[0] > NATIVE_ROWS[self.bits]:  # a long prefill: dequantize once, then GEMM
            return F.linear(x2, self.dequantize(self.dtype))
        return torch.ops.shardwise.qlinear(x2, self.q, self.scale, self.zero, self.group,
                                           self.bits)

    def _values(self, q, s, z) -> torch.Tensor:
        """(rows, k) fp32 from untiled rows ``q`` (values, or int4 words) and their scales."""
        s = s.float().repeat_interleave(self.group, dim=-1)
        if self.method == "int8":
            return q.float() * s
        return (unpack_words(q).float() - 8) * s + z.float().repeat_interleave(self.group, -1)

    def rows(self, ids):
        """Rows ``ids`` (a lookup: tile ``i // 16``, lane ``i % 16``)."""
        t, lane = ids // 16, ids % 16
        pick = lambda a: a[t, :, lane] if a is not None else None  # noqa: E731
        return self._values(pick(self.q), pick(self.scale), pick(self.zero)).to(self.dtype)

    def dequantize(self, dtype=torch.float32):
        z = None if self.zero is None else untiled(self.zero)
        return self._values(untiled(self.q), untiled(self.scale), z).to(dtype)


def native(qt: QTensor, *, dtype: torch.dtype, device: torch.device, lookup: bool,
           consume: bool = False) -> tuple[QuantizedWeight | None, list[str]]:
    """``qt`` on ``shardwise::qlinear``, or None where it does not fit (another device or
    dtype, columns not in 32s or rows not in 16s, int4 without a kernel grid)."""
    from .. import kernels
    n, k = qt.shape
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or k % 32 or n % 16 \
            or os.environ.get("SHARDWISE_QUANT_KERNELS") == "torch" \
            or not kernels.qlinear_available():
        return None, []
    if qt.method == "int8" and qt.offset + k <= qt.group:  # per channel: one group per row
        return Native("int8", qt.q, qt.scale, None, k, dtype, device,
                      consume=consume and qt.owned), []
    if qt.method == "int4" and lookup:
        return None, []
    grid = int4_grid(n, k, qt.group, qt.offset)  # the same uniform grid for int8 groups
    if grid.kernel_group is None:
        return None, []
    if qt.method == "int8":  # exact grids only: a straddling int8 group stays dequantized
        if not grid.exact:
            return None, []
        return Native("int8", qt.q, qt.scale[:, list(grid.source)], None, grid.kernel_group,
                      dtype, device, consume=consume and qt.owned), []
    q, s, z = regrid(qt, grid.kernel_group, grid.source)
    notes = [f"re-quantized {grid.requantized} of {len(grid.source)} groups of "
             f"{grid.kernel_group} straddling the source groups of {qt.group} (the slice "
             f"starts {qt.offset} columns into one)"] if grid.requantized else []
    return Native("int4", q, s, z, grid.kernel_group, dtype, device), notes
