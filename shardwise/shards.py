"""Which part of a full (unsharded) tensor a rank's parameter holds.

A sharded parameter carries ``param.pieces``: a list of :class:`Piece`. The local tensor is the
concatenation, along ``dim``, of rows ``[start, stop)`` of one or more full tensors, each followed
by ``pad`` zero rows (vocabulary padding). A fused QKV weight on a rank is three pieces::

    local = cat([Wq[q0*d : q1*d], Wk[k0*d : k1*d], Wv[k0*d : k1*d]], dim=0)

A piece's ``key`` names the full tensor relative to the parameter's module: ``""`` is the
parameter itself; ``"q_proj"`` in module ``...self_attn.qkv_proj`` with attribute ``weight`` names
``...self_attn.q_proj.weight``. Our modules are named like Hugging Face's Llama, so these names are
exactly the checkpoint's: loading, initialising, saving and merging all follow from the pieces.
A parameter without pieces is replicated on every rank.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class Piece:
    key: str
    dim: int
    start: int
    stop: int
    full: int  # the full tensor's size along ``dim`` (real, without padding)
    pad: int = 0

    @property
    def length(self) -> int:
        return self.stop - self.start + self.pad


def full_name(param_path: str, key: str) -> str:
    """``model.layers.0.self_attn.qkv_proj.weight`` + ``q_proj`` -> ``...self_attn.q_proj.weight``."""
    if not key:
        return param_path
    module, attr = param_path.rsplit(".", 1)
    parent = module.rsplit(".", 1)[0] if "." in module else ""
    return f"{parent}.{key}.{attr}" if parent else f"{key}.{attr}"


def pieces_of(param: torch.Tensor) -> list[Piece] | None:
    return getattr(param, "pieces", None)


def full_shape(param: torch.Tensor, piece: Piece) -> tuple[int, ...]:
    shape = list(param.shape)
    shape[piece.dim] = piece.full
    return tuple(shape)


def sharded_params(module: nn.Module) -> Iterator[tuple[str, nn.Parameter, list[Piece] | None]]:
    """``(path, parameter, pieces or None)`` for every parameter, tied ones once."""
    for path, p in module.named_parameters(remove_duplicate=True):
        yield path, p, pieces_of(p)


ReadFn = Callable[[str, tuple, int, int, int], torch.Tensor]
"""``read(name, full_shape, dim, start, stop)``: rows ``[start, stop)`` along ``dim`` of the full
tensor ``name``, whose shape should be ``full_shape`` (readers check it)."""


def assemble_local(path: str, param: torch.Tensor, read: ReadFn) -> torch.Tensor:
    """The rank's local tensor for ``param``, reading only its rows through ``read``."""
    pieces = pieces_of(param)
    if not pieces:
        return read(path, tuple(param.shape), 0, 0, param.shape[0] if param.dim() else 0)
    parts = []
    for pc in pieces:
        part = read(full_name(path, pc.key), full_shape(param, pc), pc.dim, pc.start, pc.stop)
        if pc.pad:
            shape = list(part.shape)
            shape[pc.dim] = pc.pad
            part = torch.cat([part, part.new_zeros(shape)], dim=pc.dim)
        parts.append(part)
    return torch.cat(parts, dim=pieces[0].dim)


def split_local(path: str, local: torch.Tensor) -> Iterator[tuple[str, Piece | None, torch.Tensor]]:
    """Inverse of :func:`assemble_local`: ``(full name, piece, rows)`` without the padding."""
    pieces = pieces_of(local)
    if not pieces:
        yield path, None, local
        return
    offset = 0
    for pc in pieces:
        rows = local.narrow(pc.dim, offset, pc.stop - pc.start)
        offset += pc.length
        yield full_name(path, pc.key), pc, rows


def split_flat(path: str, local: torch.Tensor, lo: int, hi: int
               ) -> Iterator[tuple[str, Piece | None, int, int, int, int]]:
    """Elements ``[lo, hi)`` of the flattened local tensor (a ZeRO shard of it), mapped to the full
    tensors they belong to: ``(full name, piece, a, b, i, j)`` says that local flat elements
    ``[i, j)`` are elements ``[a, b)`` of the piece's block (the rows ``[start, stop)`` of the full
    tensor along ``dim``, flattened row-major). Padding rows map to nothing.

    Pieces along dim 0 are contiguous row blocks of the local tensor; a single piece along another
    dim is the whole local tensor (row-parallel weights).
    """
    pieces = pieces_of(local)
    if not pieces:
        yield path, None, lo, hi, lo, hi
        return
    if len(pieces) > 1 and any(pc.dim != 0 for pc in pieces):
        raise NotImplementedError(f"{path}: flat ranges of several pieces along dim > 0")
    if pieces[0].dim != 0:
        if pieces[0].pad:
            raise NotImplementedError(f"{path}: padding along dim {pieces[0].dim}")
        yield full_name(path, pieces[0].key), pieces[0], lo, hi, lo, hi
        return
    row = local[0].numel() if local.dim() > 1 else 1  # elements per row
    offset = 0
    for pc in pieces:
        first, last = offset * row, (offset + pc.stop - pc.start) * row  # real rows, no padding
        i, j = max(lo, first), min(hi, last)
        if i < j:
            yield full_name(path, pc.key), pc, i - first, j - first, i, j
        offset += pc.length


def seeded_normal(name: str, shape: tuple[int, ...], *, seed: int, std: float) -> torch.Tensor:
    """A full tensor drawn from N(0, std^2) by a generator seeded from ``seed`` and the tensor's
    name: the same on every rank and at every tp, so initialisation does not depend on tp."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(shape, generator=gen) * std


def seeded_reader(*, seed: int, std: float, fill=0.0) -> ReadFn:
    """A :data:`ReadFn` over the full tensors an unsharded model would be initialised with:
    matrices and embeddings N(0, std^2) (Llama's ``initializer_range``); vectors ``fill`` (a
    number, or a function of the tensor's name giving one). Each full tensor is materialised, on
    CPU."""
    def read(name: str, shape: tuple, dim: int, start: int, stop: int) -> torch.Tensor:
        full = seeded_normal(name, shape, seed=seed, std=std) if len(shape) >= 2 \
            else torch.full(shape, fill(name) if callable(fill) else fill)
        return full.narrow(dim, start, stop - start) if full.dim() else full
    return read


@torch.no_grad()
def init_weights(module: nn.Module, *, seed: int = 0, std: float = 0.02) -> None:
    """Initialise every parameter as the unsharded model would be (:func:`seeded_reader`), then
    keep the local rows. A vector's fill is the parameter's ``init_fill`` (norm weights: 1, or 0
    for Gemma's ``1 + w``), else 0 (biases). Placeholders of quantized weights (on the meta
    device) are left to the quantized loader."""
    for path, p, _ in sharded_params(module):
        if not p.is_meta:
            read = seeded_reader(seed=seed, std=std, fill=getattr(p, "init_fill", 0.0))
            p.copy_(assemble_local(path, p, read).to(p.dtype))
