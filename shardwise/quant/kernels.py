"""The runtime form of one rank's quantized weight: what a layer's matmul reads.

:func:`prepare` turns a rank's :class:`~shardwise.quant.qtensor.QTensor` into one of

=================  ===========================================================  ================
form               matmul ``y = x W^T``                                        bytes per weight
=================  ===========================================================  ================
``int8``           ``aten._weight_int8pack_mm(x, q, s)``: per-channel scales    1 + a / k
``int8-blocks``    one int8 kernel call per block column, summed (GGUF Q8_0)    1 + a / block
``int4``           ``aten._weight_int4pack_mm_for_cpu(x, packed, kg, sz)``      1/2 + 2 a / kg
``int4-cuda``      ``aten._weight_int4pack_mm`` (CUDA's own packing, bf16)      1/2 + 2 a / kg
``int8-native``    ``shardwise::qlinear``: int8 in groups (or per channel)         1 + a / group
``int4-native``    ``shardwise::qlinear``: int4 in groups                          1/2 + 2 a / kg
                   (both in :mod:`.native`)
``dequantize``     ``F.linear(x, dequantize(W))``: any grid, any shape           q + 8 / group
=================  ===========================================================  ================

(``a``: bytes of the activation dtype, in which the kernels keep scales and zero points; the
int4 kernel group ``kg`` and re-quantized straddling groups: :mod:`shardwise.quant.grid`.)

The native forms (:mod:`.native` on ``shardwise/kernels/qlinear.cpp``; AVX-512 CPUs, fp32 and
bf16 activations) stream the weight once and dequantize it in registers, for the few rows of a
decode step and for prefills up to :data:`.native.NATIVE_ROWS` rows; above, they dequantize the
whole weight once and run the GEMM. They take any group that is a multiple of 32 dividing the
rank's columns, int8 included (Q8_0's blocks of 32 or ``--group``), which torch's int8 kernel
does not. Where they are built they are the CPU's forms; torch's kernels are the fallback (and
the forms with ``SHARDWISE_QUANT_KERNELS=torch`` in the environment, for comparison).

Facts about torch 2.13's CPU kernels this relies on (checked by ``tests/test_quant.py``): the
int8 kernel takes per-output-channel scales only, a 2-D contiguous ``x`` and, in bf16, ``k`` a
multiple of 8 (other ``k`` crash it); the int4 kernel computes ``(q - 8) s + z`` and packs rows
in blocks of 64 (so packing 64-row chunks equals packing the whole). Both are fast only in
bf16 (AVX-512 BF16 paths); in fp32 they are exact but slow (the tests' path).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import WeightForm
from .grid import int4_grid
from .qtensor import QTensor, pack_nibbles, quantize, unpack_nibbles

PACK_ROWS = 256  # rows packed at a time (a multiple of the kernel's 64-row blocks)


class QuantizedWeight(WeightForm):
    """One rank's ``(n, k)`` quantized weight (:class:`~shardwise.kernels.WeightForm`'s
    interface): ``linear(x, bias)``, ``rows(ids)`` dequantized, ``dequantize()``."""

    no_backward = ("quantized weights are for inference and have no backward: train the float "
                   "model, then quantize it (shardwise convert --quant)")


class Int8Channel(QuantizedWeight):
    """int8 values ``q`` (n, k), one scale per output row in the activation dtype."""

    form = "int8"

    def __init__(self, qt: QTensor, dtype: torch.dtype, device) -> None:
        super().__init__(*qt.shape, dtype)
        self.register_buffer("q", qt.q.contiguous().to(device))
        self.register_buffer("scale", qt.scale[:, 0].to(dtype).to(device).contiguous())
        # bf16/fp16 kernels read k in vectors of 8 and crash otherwise; CUDA: dequantize
        self.kernel = device.type == "cpu" and (dtype == torch.float32 or self.k % 8 == 0)

    def _mm(self, x2):
        if self.kernel:
            return torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)
        return F.linear(x2, self.dequantize(self.dtype))

    def rows(self, ids):
        return (F.embedding(ids, self.q).float() * self.scale[ids].float().unsqueeze(-1)
                ).to(self.dtype)

    def dequantize(self, dtype=torch.float32):
        return (self.q.float() * self.scale.float().unsqueeze(1)).to(dtype)


class Int8Blocks(QuantizedWeight):
    """int8 in blocks of ``b`` columns (GGUF Q8_0: 32), stored block-major ``(k/b, n, b)`` so
    that each block column is one contiguous int8 matrix for the per-channel kernel::

        y = sum_j  x[:, j b : (j+1) b] q_j^T * s_j      (k / b kernel calls)
    """

    form = "int8-blocks"

    def __init__(self, qt: QTensor, dtype: torch.dtype, device) -> None:
        super().__init__(*qt.shape, dtype)
        b = self.block = qt.group
        blocks = qt.q.reshape(self.n, -1, b).transpose(0, 1)        # (k/b, n, b)
        self.register_buffer("q", blocks.contiguous().to(device))
        self.register_buffer("scale", qt.scale.t().to(dtype).contiguous().to(device))  # (k/b, n)
        self.kernel = device.type == "cpu" and (dtype == torch.float32 or b % 8 == 0)

    def _mm(self, x2):
        if not self.kernel:
            return F.linear(x2, self.dequantize(self.dtype))
        xb = x2.view(x2.shape[0], -1, self.block).transpose(0, 1)    # (k/b, tokens, b)
        y = None
        for j in range(self.q.shape[0]):
            part = torch.ops.aten._weight_int8pack_mm(xb[j].contiguous(), self.q[j],
                                                      self.scale[j])
            y = part if y is None else y.add_(part)
        return y

    def rows(self, ids):
        q = self.q[:, ids].float()                                   # (k/b, ..., b)
        s = self.scale[:, ids].float().unsqueeze(-1)                 # (k/b, ..., 1)
        out = (q * s).movedim(0, -2)                                 # (..., k/b, b)
        return out.reshape(*ids.shape, self.k).to(self.dtype)

    def dequantize(self, dtype=torch.float32):
        w = self.q.float() * self.scale.float().unsqueeze(-1)        # (k/b, n, b)
        return w.transpose(0, 1).reshape(self.n, self.k).to(dtype)


def regrid(qt: QTensor, kg: int, source: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Values, scales and zero points on the kernel grid: source groups repeated, straddling
    groups re-quantized from their dequantized values."""
    src = torch.tensor(source)
    keep = src >= 0
    s = torch.zeros(qt.shape[0], len(source))
    z = torch.zeros_like(s)
    s[:, keep], z[:, keep] = qt.scale[:, src[keep]], qt.zero[:, src[keep]]
    q = qt.q
    for j in torch.nonzero(~keep).flatten().tolist():
        if q is qt.q:
            q = q.clone()
        fresh = quantize(qt.cols(j * kg, (j + 1) * kg).dequantize(), "int4", group=kg)
        q[:, j * kg:(j + 1) * kg] = fresh.q
        s[:, j], z[:, j] = fresh.scale[:, 0], fresh.zero[:, 0]
    return q, s, z


class Int4Kernel(QuantizedWeight):
    """int4 on torch's kernel: packed values and ``sz`` (k/kg, n, 2) = (scale, zero point) per
    kernel group, in the activation dtype."""

    form = "int4"

    def __init__(self, qt: QTensor, kg: int, source: tuple[int, ...], dtype: torch.dtype,
                 device) -> None:
        super().__init__(*qt.shape, dtype)
        self.kg = kg
        q, s, z = regrid(qt, kg, source)
        sz = torch.stack([s.t(), z.t()], dim=-1)                     # (k/kg, n, 2)
        self.register_buffer("sz", sz.to(dtype).contiguous().to(device))
        self.register_buffer("packed", self._pack(q, device))

    def _pack(self, q: torch.Tensor, device) -> torch.Tensor:
        """Packed in chunks of rows (the kernel packs blocks of 64 rows independently), so that
        the int32 copy the packing function wants is small."""
        out = torch.empty(self.n, self.k // 2, dtype=torch.uint8)
        for r in range(0, self.n, PACK_ROWS):
            out[r:r + PACK_ROWS] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q[r:r + PACK_ROWS].to(torch.int32).contiguous(), 1)
        return out.to(device)

    def _mm(self, x2):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.kg, self.sz)

    def dequantize(self, dtype=torch.float32):
        eye = torch.eye(self.k, dtype=self.dtype, device=self.packed.device)
        return self._mm(eye).t().to(dtype)                          # (n, k): W^T = I W^T


class Int4Cuda(Int4Kernel):
    """int4 on CUDA (tinygemm): values packed by ``aten._convert_weight_to_int4pack`` from two
    per byte (even column in the high nibble), bf16 activations only."""

    form = "int4-cuda"

    def _pack(self, q, device):
        pairs = q.view(self.n, -1, 2)                                # (n, k/2, 2)
        hi_even = ((pairs[..., 0] << 4) | pairs[..., 1]).to(torch.uint8).contiguous()
        tiles = next(t for t in (8, 4, 2) if self.k % (16 * t) == 0)
        return torch.ops.aten._convert_weight_to_int4pack(hi_even.to(device), tiles)

    def _mm(self, x2):
        return torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.kg, self.sz)


class Dequantize(QuantizedWeight):
    """Any grid, any shape: the exact values kept compact (int8, or int4 two per byte, fp32
    scales and zero points), dequantized at each matmul (or only the looked-up rows)."""

    form = "dequantize"

    def __init__(self, qt: QTensor, dtype: torch.dtype, device) -> None:
        super().__init__(*qt.shape, dtype)
        self.method, self.group, self.offset = qt.method, qt.group, qt.offset
        q = qt.q if qt.method == "int8" else pack_nibbles(qt.q)
        self.register_buffer("q", q.contiguous().to(device))
        self.register_buffer("scale", qt.scale.contiguous().to(device))
        zero = qt.zero if qt.zero is not None else torch.zeros(0)
        self.register_buffer("zero", zero.contiguous().to(device))
        self.register_buffer("index", ((torch.arange(self.k) + self.offset) // self.group
                                       ).to(device), persistent=False)

    def _values(self, q, s, z) -> torch.Tensor:
        """Dequantized (rows, k) in fp32 from stored rows ``q`` and their scales."""
        if self.method == "int8":
            return q.float() * s[..., self.index]
        vals = unpack_nibbles(q.reshape(-1, q.shape[-1]), self.k).view(*q.shape[:-1], self.k)
        return (vals.float() - 8) * s[..., self.index] + z[..., self.index]

    def rows(self, ids):
        z = self.zero[ids] if self.method == "int4" else None
        return self._values(self.q[ids], self.scale[ids], z).to(self.dtype)

    def dequantize(self, dtype=torch.float32):
        z = self.zero if self.method == "int4" else None
        return self._values(self.q, self.scale, z).to(dtype)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.q, self.scale, self.zero))


def prepare(qt: QTensor, *, dtype: torch.dtype, device: torch.device | str = "cpu",
            lookup: bool = False, consume: bool = False) -> tuple[QuantizedWeight, list[str]]:
    """The runtime form of ``qt`` (see the module table) and notes for the load report.

    ``lookup``: the weight is also an embedding (rows are looked up), which the int4 kernels'
    packing does not allow: int4 embeddings keep the compact form. ``consume``: ``qt`` is not
    used afterwards (the loader's case): a form may lay out ``qt.q`` in its own memory when
    ``qt.owned``.
    """
    device = torch.device(device)
    n, k = qt.shape
    from .native import native
    form, notes = native(qt, dtype=dtype, device=device, lookup=lookup, consume=consume)
    if form is not None:
        return form, notes
    if qt.method == "int8":
        if qt.offset + k <= qt.group:
            return Int8Channel(qt, dtype, device), []
        if qt.offset == 0 and k % qt.group == 0:
            return Int8Blocks(qt, dtype, device), []
        return Dequantize(qt, dtype, device), [f"int8 blocks not aligned to the slice "
                                               f"(offset {qt.offset}): dequantize-then-matmul"]
    grid = int4_grid(n, k, qt.group, qt.offset)
    if lookup:
        return Dequantize(qt, dtype, device), []
    if grid.kernel_group is None:
        return Dequantize(qt, dtype, device), [grid.reason + ": dequantize-then-matmul"]
    notes = []
    if grid.requantized:
        notes.append(f"re-quantized {grid.requantized} of {len(grid.source)} groups of "
                     f"{grid.kernel_group} straddling the source groups of {qt.group} (the "
                     f"slice starts {qt.offset} columns into one)")
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return Dequantize(qt, dtype, device), ["the CUDA int4 kernel takes bf16 only: "
                                                   "dequantize-then-matmul"]
        return Int4Cuda(qt, grid.kernel_group, grid.source, dtype, device), notes
    return Int4Kernel(qt, grid.kernel_group, grid.source, dtype, device), notes
