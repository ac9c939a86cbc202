"""How a dimension of N units splits over t ranks.

A *unit* is whatever must not be cut: an attention head, a row of the vocabulary, a column of the
MLP's intermediate dimension. Rank r owns a contiguous range of units; sizes differ by at most one
unit, the first ``N mod t`` ranks taking the extra one (9 heads on 2 ranks -> 5 + 4; on 4 ranks ->
3 + 2 + 2 + 2).

The vocabulary is the exception: it is *padded* up to a multiple of ``t x multiple`` so that every
rank owns the same number of rows (Megatron-LM pads to a multiple of 128 x t). Padded rows hold no
token: they are masked out of the logits and dropped when a checkpoint is merged.
"""
from __future__ import annotations

from dataclasses import dataclass


def _check(total: int, parts: int, unit: str) -> None:
    if parts < 1:
        raise ValueError(f"cannot split {unit} over {parts} ranks: the number of ranks must be >= 1")
    if total < parts:
        raise ValueError(
            f"tp={parts} but there are only {total} {unit}: each rank needs at least one; "
            f"use tp <= {total}")


def split_sizes(total: int, parts: int, *, unit: str = "units",
                empty_ok: bool = False) -> list[int]:
    """Sizes of ``parts`` contiguous pieces of ``total`` units, as even as possible.
    ``empty_ok`` allows pieces of none (the planner scores layouts a model cannot take)."""
    if parts < 1 or not empty_ok:
        _check(total, parts, unit)
    base, extra = divmod(total, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


def aligned_sizes(total: int, parts: int, *, multiple: int, unit: str = "columns") -> list[int]:
    """Sizes of ``parts`` contiguous pieces of ``total`` that start on multiples of ``multiple``
    (quantization groups: 1536 columns in groups of 128 over 5 ranks -> 384 + 384 + 256 + 256 +
    256): blocks of ``multiple`` (the last may be short) split as evenly as possible. Where there
    are fewer blocks than parts, ``multiple`` halves until there are enough (down to 1)."""
    _check(total, parts, unit)
    while multiple > 1 and -(-total // multiple) < parts:
        multiple //= 2
    blocks = split_sizes(-(-total // multiple), parts, unit=unit)
    sizes = [b * multiple for b in blocks]
    sizes[-1] -= sum(sizes) - total  # the last block is short
    return sizes


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """Layers of pipeline stage ``stage``: contiguous, as even as possible (earlier stages get
    the extra layer: the last stage also runs the LM head)."""
    sizes = split_sizes(num_layers, pp, unit="layers")
    start = sum(sizes[:stage])
    return range(start, start + sizes[stage])


@dataclass(frozen=True)
class Partition:
    """A dimension of ``total`` units split over ``parts`` ranks.

    ``unit`` names the units for error messages ("query heads", "vocabulary rows").
    ``multiple`` pads ``total`` up to a multiple of ``parts x multiple`` first (0 = no padding),
    so that the pieces are equal; ``padded`` is the padded size and ``pad`` the padding.
    """

    total: int
    parts: int
    unit: str = "units"
    multiple: int = 0

    def __post_init__(self) -> None:
        # padding gives every rank rows even when total < parts; without it each needs a unit
        _check(self.padded if self.multiple and self.parts >= 1 else self.total, self.parts,
               self.unit)

    @property
    def padded(self) -> int:
        if not self.multiple:
            return self.total
        step = self.parts * self.multiple
        return -(-self.total // step) * step

    @property
    def pad(self) -> int:
        return self.padded - self.total

    @property
    def sizes(self) -> list[int]:
        return split_sizes(self.padded, self.parts, unit=self.unit)

    @property
    def offsets(self) -> list[int]:
        out, acc = [], 0
        for s in self.sizes:
            out.append(acc)
            acc += s
        return out

    @property
    def even(self) -> bool:
        return len(set(self.sizes)) == 1

    def range(self, rank: int) -> tuple[int, int]:
        """``[start, stop)`` of the (padded) units rank ``rank`` owns."""
        if not 0 <= rank < self.parts:
            raise ValueError(f"rank {rank} is outside 0..{self.parts - 1}")
        start = self.offsets[rank]
        return start, start + self.sizes[rank]

    def real_range(self, rank: int) -> tuple[int, int]:
        """Like :meth:`range` but clipped to the real (unpadded) units; may be empty."""
        start, stop = self.range(rank)
        return min(start, self.total), min(stop, self.total)

    def owner(self, unit_index: int) -> int:
        """The rank that owns (padded) unit ``unit_index``."""
        for r in range(self.parts):
            start, stop = self.range(r)
            if start <= unit_index < stop:
                return r
        raise ValueError(f"unit {unit_index} is outside 0..{self.padded - 1}")


def vocab_partition(vocab_size: int, tp: int, *, multiple: int = 1) -> Partition:
    """The vocabulary padded to a multiple of ``tp x multiple`` and split evenly."""
    return Partition(vocab_size, tp, unit="vocabulary rows", multiple=max(1, multiple))


@dataclass(frozen=True)
class HeadLayout:
    """Which query and key/value heads each tensor-parallel rank owns.

    Query heads split as evenly as possible (:class:`Partition`). Query head ``h`` reads KV head
    ``h // group`` with ``group = heads / kv_heads``. Each rank holds exactly the KV heads its
    query heads read: when tp divides ``kv_heads`` these are disjoint shards; otherwise a KV head
    read by query heads on several ranks is *replicated* on each of them (vLLM's replication for
    tp a multiple of kv_heads is the special case). The gradients of a replicated KV head must be
    summed over the ranks that hold it; :meth:`shared_kv_heads` lists them.
    """

    heads: int
    kv_heads: int
    tp: int

    def __post_init__(self) -> None:
        if self.kv_heads < 1 or self.heads % self.kv_heads:
            raise ValueError(
                f"{self.heads} query heads cannot be grouped over {self.kv_heads} KV heads: "
                "the number of query heads must be a multiple of the number of KV heads")
        if self.tp > self.heads:
            ok = ", ".join(str(t) for t in range(1, self.heads + 1))
            raise ValueError(
                f"tp={self.tp} but the model has {self.heads} query heads: "
                f"each rank needs at least one head; use tp in {{{ok}}}")
        Partition(self.heads, self.tp, unit="query heads")

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def q_partition(self) -> Partition:
        return Partition(self.heads, self.tp, unit="query heads")

    def q_range(self, rank: int) -> tuple[int, int]:
        return self.q_partition.range(rank)

    def kv_range(self, rank: int) -> tuple[int, int]:
        q0, q1 = self.q_range(rank)
        return q0 // self.group, (q1 - 1) // self.group + 1

    def kv_index(self, rank: int) -> list[int]:
        """For each local query head, the index of its KV head among the rank's local KV heads."""
        q0, q1 = self.q_range(rank)
        k0, _ = self.kv_range(rank)
        return [h // self.group - k0 for h in range(q0, q1)]

    def holders(self, kv_head: int) -> list[int]:
        """The ranks that hold KV head ``kv_head``."""
        return [r for r in range(self.tp) if self.kv_range(r)[0] <= kv_head < self.kv_range(r)[1]]

    def shared_kv_heads(self) -> list[int]:
        """KV heads held by more than one rank (their gradients need a reduction)."""
        return [k for k in range(self.kv_heads) if len(self.holders(k)) > 1]

    @property
    def replicated(self) -> bool:
        return bool(self.shared_kv_heads())
