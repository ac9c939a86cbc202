"""How a rank's columns of a grouped int4 tensor map onto the int4 kernel's uniform groups.

torch's CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``) takes one group size ``kg`` in
{32, 64, 128, 256} for the whole matrix, needs ``k % kg == 0`` and ``n % 16 == 0``. A rank's
slice of columns ``[a, a + k)`` of a tensor quantized in groups of ``g`` keeps the full tensor's
groups, clipped (:class:`~shardwise.quant.qtensor.QTensor`): its first group may have lost
``offset = a mod g`` columns to the previous rank, its last may be short. Two cases:

* **exact** (``offset`` and ``k`` multiples of 32): the largest ``kg`` dividing ``g``,
  ``offset`` and ``k``; kernel group ``j`` lies inside source group ``(offset + j kg) // g``
  and repeats its scale and zero point. No value changes. SmolLM2's hidden size 576 = 4.5 x 128
  runs groups of 128 as kernel groups of 64; a 9-head layer split 5 + 4 (320 + 256 columns)
  likewise; a GGUF's 32-blocks as groups of 32.
* **re-quantized** (``offset`` not a multiple of 32: head dimensions such as 48 or 80 with
  uneven head splits): the largest ``kg <= g`` dividing ``k``, groups laid from the rank's first
  column. A kernel group inside one source group keeps its scale and zero point; one that
  straddles a source boundary is re-quantized from its dequantized values (min-max, as
  :func:`~shardwise.quant.qtensor.quantize`): its error is at most half its new step. The loader
  says which weight, which rank and how many groups.

``k`` not a multiple of 32 or ``n`` not a multiple of 16: no kernel; the rank runs
dequantize-then-matmul on its exact values.

Pure Python (no torch): the planner and the loader agree through it.
"""
from __future__ import annotations

from dataclasses import dataclass

KERNEL_GROUPS = (256, 128, 64, 32)
ROWS_MULTIPLE = 16  # output features per rank the CPU kernel packs in


@dataclass(frozen=True)
class Int4Grid:
    """``kernel_group``: the kernel's group size (None: no kernel); ``source``: for each kernel
    group, the index of the source group it repeats (relative to the slice's first group), or
    -1 where it straddles two and is re-quantized; ``reason``: why there is no kernel."""

    kernel_group: int | None
    source: tuple[int, ...] = ()
    reason: str = ""

    @property
    def requantized(self) -> int:
        return sum(1 for s in self.source if s < 0)

    @property
    def exact(self) -> bool:
        return self.kernel_group is not None and not self.requantized


def int4_grid(n: int, k: int, group: int, offset: int = 0) -> Int4Grid:
    """The kernel layout of an ``(n, k)`` int4 slice in groups of ``group`` (see the module doc)."""
    if k % 32 or n % ROWS_MULTIPLE:
        return Int4Grid(None, reason=f"{n} x {k} does not fit the int4 kernel (it needs the "
                        f"columns a multiple of 32 and the rows of {ROWS_MULTIPLE})")
    sizes = [kg for kg in KERNEL_GROUPS if kg <= group and group % kg == 0 and k % kg == 0]
    exact = [kg for kg in sizes if offset % kg == 0]
    kg = exact[0] if exact else sizes[0]
    source = []
    for j in range(k // kg):
        first, last = offset + j * kg, offset + (j + 1) * kg - 1
        source.append(first // group if first // group == last // group else -1)
    return Int4Grid(kg, tuple(source))


def kernel_bytes(n: int, k: int, group: int, offset: int = 0, *, act_bytes: int = 2,
                 method: str = "int4") -> int:
    """Bytes one rank holds for an ``(n, k)`` slice in the runtime form the loader builds:

    * int4 on the kernel: ``n k / 2`` packed values + ``(k / kg) n`` (scale, zero) pairs in the
      activation dtype; without a kernel: the values two per byte + fp32 scales and zero points;
    * int8 per channel (``group >= k``): ``n k`` + ``n`` scales in the activation dtype; int8 in
      groups: ``n k`` + one scale per kernel group (the grid above, exact grids only; else fp32
      scales per source group, dequantized at each matmul).
    """
    if method == "int8":
        if group >= k + offset:
            return n * k + n * act_bytes
        grid = int4_grid(n, k, group, offset)
        if grid.exact:
            return n * k + n * (k // grid.kernel_group) * act_bytes
        return n * k + n * -(-(offset + k) // group) * 4
    grid = int4_grid(n, k, group, offset)
    if grid.kernel_group is None:
        groups = -(-(offset + k) // group)
        return n * -(-k // 2) + 2 * n * groups * 4
    return n * k // 2 + 2 * n * (k // grid.kernel_group) * act_bytes
