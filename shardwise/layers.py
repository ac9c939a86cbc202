"""Megatron-style sharded layers.

Column parallel, weight ``W`` of shape ``(out, in)`` split by output rows ``W = [W_1; ...; W_t]``::

    Y_i = X W_i^T          X replicated (b, s, in)  ->  Y_i (b, s, out_i)
    dX  = sum_i dY_i W_i   (all-reduce: *f*'s backward, overlapped with the weight gradient)
    dW_i = dY_i^T X        (local)

Row parallel, ``W = [W_1, ..., W_t]`` split by input columns, input already split ``X = [X_1 ... X_t]``::

    Y  = sum_i X_i W_i^T + b   (all-reduce: *g*; the bias added once, after the sum)
    dX_i = dY W_i, dW_i = dY^T X_i   (local)

A column layer followed by a row layer (attention: QKV then output; MLP: gate/up then down)
costs one all-reduce forward and one backward. With sequence parallelism the activations between
blocks are split along the sequence: the column layer all-gathers its input (reduce-scatter
backward) and the row layer reduce-scatters its output (all-gather backward).

Quantized weights (``quant=``, a :class:`~shardwise.quant.qtensor.QuantConfig`): the layer's
``weight`` is a placeholder on the meta device that carries the pieces and ``weight.quant =
(method, group)``; :func:`shardwise.quant.load.load_quantized` replaces it with ``qweight``, a
:class:`~shardwise.quant.kernels.QuantizedWeight` holding this rank's slice on the full tensor's
quantization grid (or, where a source keeps a tensor dense, with a plain ``weight`` again). The
forward is the same with ``x W^T`` done by the quantized kernel; there is no backward.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import comm, kernels
from .mesh import ProcessGroup, group_rank, group_size
from .partition import Partition, aligned_sizes
from .shards import Piece


def even_pieces(full: int, group: ProcessGroup | None, *, dim: int = 0, unit_size: int = 1,
                unit: str = "features", multiple: int = 1) -> list[Piece]:
    """One piece: this rank's share of ``full`` (= units x unit_size), split as evenly as
    possible; with ``multiple``, on multiples of it (quantization groups: :func:`aligned_sizes`)."""
    if multiple > 1:
        sizes = aligned_sizes(full, group_size(group), multiple=multiple, unit=unit)
        r = group_rank(group)
        return [Piece("", dim, sum(sizes[:r]), sum(sizes[:r + 1]), full)]
    part = Partition(full // unit_size, group_size(group), unit=unit)
    start, stop = part.range(group_rank(group))
    return [Piece("", dim, start * unit_size, stop * unit_size, full)]


def _all_sizes(full: int, group: ProcessGroup | None, multiple: int = 1) -> list[int]:
    if multiple > 1:
        return aligned_sizes(full, group_size(group), multiple=multiple, unit="features")
    return Partition(full, group_size(group), unit="features").sizes


def group_multiple(quant) -> int:
    """Columns that a row-parallel split of a ``quant``-quantized weight keeps together: the
    int4 group (1 for dense and per-channel int8 weights)."""
    return quant.group if quant is not None and quant.group else 1


def _weight(shape: tuple[int, int], dtype, device, quant: tuple[str, int] | None) -> nn.Parameter:
    """A dense weight, or (``quant = (method, group)``) a placeholder for a quantized one."""
    if quant is None:
        return nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
    p = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
    p.quant = quant
    return p


def _mark(p: nn.Parameter, pieces: list[Piece] | None = None, *, sp_partial: bool = False) -> None:
    if pieces is not None:
        p.pieces = pieces
    if sp_partial:
        p.tp_partial_grad = True  # grad is a partial sum over sequence shards


class _ColumnMatmul(torch.autograd.Function):
    """``Y = X W^T (+ b)`` entering a TP region: *f* fused with the matmul so that the backward
    all-reduce of dX runs while dW is computed (Megatron's async grad all-reduce)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        # under autocast the forward ran in dy's dtype (bf16): so does the backward
        w, xs = weight.to(dy.dtype), x.to(dy.dtype)
        dx = dy.matmul(w)
        shared_memory = comm.backend_name(ctx.group) == "shm"
        if shared_memory:  # microseconds: nothing to hide it behind
            comm.all_reduce_(dx, ctx.group)
        else:  # launch, compute dW while the network works, then wait
            work = comm.dist.all_reduce(dx, group=ctx.group, async_op=True)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dw = dy2.t().matmul(xs.reshape(-1, xs.shape[-1])).to(weight.dtype)
        db = dy2.sum(0).to(weight.dtype) if ctx.has_bias else None
        if not shared_memory:
            work.wait()
        return dx.to(x.dtype), dw, db, None


class ColumnParallelLinear(nn.Module):
    """``Y = X W^T + b`` with ``W`` split by output rows.

    ``out`` is the full output size (split evenly) or an explicit list of :class:`Piece` (fused
    layouts: QKV, gate/up). ``gather_output`` all-gathers the output (only for an even/uneven split
    of one tensor). ``sequence_parallel``: the input is split along the sequence (dim 1) and is
    all-gathered first.
    """

    def __init__(self, in_features: int, out: int | Sequence[Piece], *,
                 group: ProcessGroup | None, bias: bool = False, gather_output: bool = False,
                 sequence_parallel: bool = False, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, quant=None) -> None:
        super().__init__()
        self.group, self.gather_output, self.sequence_parallel = group, gather_output, sequence_parallel
        self.in_features = in_features
        if isinstance(out, int):
            self.gather_sizes = _all_sizes(out, group)
            pieces = even_pieces(out, group)
        else:
            if gather_output:
                raise ValueError("gather_output needs a plain split, not fused pieces")
            self.gather_sizes, pieces = None, list(out)
        local = sum(p.length for p in pieces)
        self.qweight = None
        self.weight = _weight((local, in_features), dtype, device,
                              quant and (quant.method, quant.group))
        _mark(self.weight, [Piece(p.key, 0, p.start, p.stop, p.full, p.pad) for p in pieces])
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(local, dtype=dtype, device=device))
            _mark(self.bias, [Piece(p.key, 0, p.start, p.stop, p.full, p.pad) for p in pieces])

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.qweight is not None and weight is None:
            x = comm.gather_seq(x, self.group) if self.sequence_parallel else x
            y = self.qweight.linear(x, self.bias)
            return comm.gather_from_tp(y, self.group, self.gather_sizes) if self.gather_output \
                else y
        weight = self.weight if weight is None else weight
        if self.sequence_parallel:
            y = F.linear(comm.gather_seq(x, self.group), weight, self.bias)
        elif group_size(self.group) > 1 and torch.is_grad_enabled() and x.requires_grad:
            y = _ColumnMatmul.apply(x, weight, self.bias, self.group)
        else:
            y = kernels.linear(x, weight, self.bias)
        if self.gather_output:
            y = comm.gather_from_tp(y, self.group, self.gather_sizes)
        return y


class RowParallelLinear(nn.Module):
    """``Y = X W^T + b`` with ``W`` split by input columns; the partial products are summed.

    ``input_is_parallel``: the input already holds this rank's columns (the usual case after a
    column layer); otherwise it is split first. ``in_pieces`` gives an uneven split explicitly
    (e.g. 5 + 4 heads x head_dim). The bias is replicated and added once, after the reduction.
    ``sequence_parallel``: reduce-scatter the output along the sequence instead of all-reducing.
    """

    def __init__(self, in_features: int, out_features: int, *, group: ProcessGroup | None,
                 bias: bool = False, input_is_parallel: bool = True,
                 sequence_parallel: bool = False, in_pieces: Sequence[Piece] | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 quant=None) -> None:
        super().__init__()
        self.group, self.input_is_parallel = group, input_is_parallel
        self.sequence_parallel = sequence_parallel
        multiple = group_multiple(quant)
        pieces = [Piece(p.key, 1, p.start, p.stop, p.full) for p in in_pieces] if in_pieces \
            else even_pieces(in_features, group, dim=1, multiple=multiple)
        self.split_sizes = None if in_pieces else _all_sizes(in_features, group, multiple)
        local = sum(p.length for p in pieces)
        self.qweight = None
        self.weight = _weight((out_features, local), dtype, device,
                              quant and (quant.method, quant.group))
        _mark(self.weight, pieces)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
            _mark(self.bias, sp_partial=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = comm.scatter_to_tp(x, self.group, self.split_sizes)
        y = kernels.linear(x, self.weight) if self.qweight is None else self.qweight.linear(x)
        y = comm.reduce_scatter_seq(y, self.group) if self.sequence_parallel \
            else comm.reduce_from_tp(y, self.group)
        return y if self.bias is None else y + self.bias


def _vocab_rows(module: nn.Module, num_embeddings: int, embedding_dim: int,
                group: ProcessGroup | None, pad_multiple: int, dtype, device,
                quant=None) -> nn.Parameter:
    """Give ``module`` its vocabulary partition (``partition``, ``start``, ``stop``) and return
    a weight of its rows ``(stop - start, embedding_dim)``, padding rows included."""
    module.num_embeddings = num_embeddings
    module.partition = Partition(num_embeddings, group_size(group), unit="vocabulary rows",
                                 multiple=max(1, pad_multiple))
    module.start, module.stop = module.partition.range(group_rank(group))
    real0, real1 = module.partition.real_range(group_rank(group))
    module.qweight = None
    weight = _weight((module.stop - module.start, embedding_dim), dtype, device,
                     quant and (quant.embedding, quant.group))
    _mark(weight, [Piece("", 0, real0, real1, num_embeddings,
                         pad=(module.stop - module.start) - (real1 - real0))])
    return weight


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split over ranks, padded to a multiple of ``tp x multiple``.

    Rank r owns rows ``[start, stop)``. Ids outside it look up row 0 and are zeroed; the partial
    embeddings are summed (all-reduce, or reduce-scatter along the sequence under sequence
    parallelism). Padded rows are zero and belong to no token.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group: ProcessGroup | None,
                 pad_multiple: int = 1, sequence_parallel: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 quant=None) -> None:
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _vocab_rows(self, num_embeddings, embedding_dim, group, pad_multiple,
                                  dtype, device, quant)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the local weight (dequantized when it is quantized)."""
        return F.embedding(ids, self.weight) if self.qweight is None else self.qweight.rows(ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.group) == 1:
            return self.lookup(ids)
        outside = (ids < self.start) | (ids >= self.stop)
        local = torch.where(outside, 0, ids - self.start)
        out = self.lookup(local)
        out = out * (~outside).unsqueeze(-1).to(out.dtype)
        if self.sequence_parallel:
            return comm.reduce_scatter_seq(out, self.group)
        return comm.reduce_from_tp(out, self.group)


class ParallelLMHead(nn.Module):
    """Vocabulary-parallel output projection: local logits ``(b, s, V_pad / t)``.

    Owns its vocabulary partition (rows ``[start, stop)`` of ``V`` padded to a multiple of
    ``tp x pad_multiple``, the embedding's rule) and its weight ``lm_head.weight``; with
    ``tied_to`` it multiplies by that embedding's weight instead (same partition, checked).
    ``softcap`` caps every logit to ``c tanh(logit / c)`` (Gemma 2; element-wise, so each rank
    caps its own slice and nothing is exchanged). Logits of padded rows are then set to ``-inf``
    so they never win an argmax or a softmax.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group: ProcessGroup | None,
                 pad_multiple: int = 1, tied_to: VocabParallelEmbedding | None = None,
                 sequence_parallel: bool = False, softcap: float | None = None,
                 dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, quant=None) -> None:
        super().__init__()
        self.group, self.sequence_parallel, self.softcap = group, sequence_parallel, softcap
        weight = _vocab_rows(self, num_embeddings, embedding_dim, group, pad_multiple, dtype,
                             "meta" if tied_to is not None else device,
                             None if tied_to is not None else quant)
        self.valid = max(0, min(self.stop, self.num_embeddings) - self.start)
        # not a submodule: the embedding is registered once, by the model
        object.__setattr__(self, "_tied", tied_to)
        if tied_to is None:
            self.weight = weight
        elif (tied_to.start, tied_to.stop, tuple(tied_to.weight.shape)) != \
                (self.start, self.stop, tuple(weight.shape)):
            raise ValueError(f"tied head rows [{self.start}, {self.stop}) x {embedding_dim} do "
                             f"not match the embedding's [{tied_to.start}, {tied_to.stop}) x "
                             f"{tied_to.weight.shape[1]}")

    def local_weight(self) -> torch.Tensor:
        return self._tied.weight if self._tied is not None else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        holder = self._tied if self._tied is not None else self
        if holder.qweight is not None:
            x = comm.gather_seq(x, self.group) if self.sequence_parallel else x
            logits = holder.qweight.linear(x)
        elif self.sequence_parallel:
            x = comm.gather_seq(x, self.group)
            logits = F.linear(x, self.local_weight())
        elif group_size(self.group) > 1 and torch.is_grad_enabled() and x.requires_grad:
            logits = _ColumnMatmul.apply(x, self.local_weight(), None, self.group)
        else:
            logits = kernels.linear(x, self.local_weight())
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.valid < logits.shape[-1]:
            logits = logits.clone()
            logits[..., self.valid:] = float("-inf")
        return logits


def gather_logits(local: torch.Tensor, head: ParallelLMHead) -> torch.Tensor:
    """Full logits ``(..., vocab)`` from the vocabulary-parallel pieces (padding dropped)."""
    full = comm.all_gather_last(local, head.group)
    return full[..., : head.num_embeddings]


@torch.no_grad()
def finalize_grads(module: nn.Module, group: ProcessGroup | None) -> int:
    """Complete the gradients that backward leaves partial across the TP group, in one all-reduce:

    * parameters replicated across TP whose gradient is a partial sum over the ranks
      (``tp_partial_grad``: norm weights and row-parallel biases under sequence parallelism,
      per-head q/k norm weights, which each rank applies to its own heads only);
    * rows of KV heads held by several ranks (uneven or replicated head layouts), summed over the
      ranks that hold them (the others contribute zeros).

    Call after backward (after all micro-batches), before clipping and the optimizer step.
    Returns the number of elements reduced (0: no collective was issued).
    """
    if group_size(group) == 1:
        return 0
    items: list[tuple[int, torch.Tensor | None]] = []
    for m in module.modules():
        if hasattr(m, "grad_sync_items"):
            items.extend(m.grad_sync_items())
    for p in module.parameters():
        if getattr(p, "tp_partial_grad", False):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            items.append((p.numel(), p.grad))
    total = sum(n for n, _ in items)
    if not total:
        return 0
    ref = next((v for _, v in items if v is not None), None)
    buf = torch.zeros(total, dtype=ref.dtype if ref is not None else torch.float32,
                      device=ref.device if ref is not None else "cpu")
    offset = 0
    for n, view in items:
        if view is not None:
            buf[offset:offset + n].copy_(view.reshape(-1))
        offset += n
    comm.all_reduce_(buf, group)
    offset = 0
    for n, view in items:
        if view is not None:
            view.copy_(buf[offset:offset + n].view_as(view))
        offset += n
    return total
