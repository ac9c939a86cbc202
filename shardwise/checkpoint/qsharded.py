"""Quantized weights in the sharded checkpoint format (:mod:`.sharded`), and writing one.

A quantized weight ``W`` (full shape ``(n, k)``, groups of ``g`` columns) is stored as three
tensors addressed, like every other, by rows of their full shapes:

    qweight/W   int8 (n, k), or int4 two per byte (n, ceil(k/2)), column 2j in the low nibble
    qscale/W    fp32 (n, ceil(k/g))
    qzero/W     fp32 (n, ceil(k/g))                    (int4 only)

each piece carrying ``"method"``, ``"group"`` and ``"cols": k``. A rank's column slice
``[a, b)`` stores the packed columns ``[a/2, b/2)`` and the groups it touches,
``[a // g, ceil(b/g))``; a group split between two ranks is stored by both (pieces may overlap).
The checkpoint's ``shardwise.json`` names the model's :class:`~shardwise.quant.qtensor.QuantConfig`
under ``"quant"``. Reading at any layout goes through :func:`quantized_reader`; writing (``shardwise
convert --quant``, or resharding a quantized checkpoint) through :func:`write_quantized`, in one
process, one target rank and one tensor at a time.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..models.config import LlamaConfig
from ..quant.load import QReadFn, assemble_quantized, is_placeholder
from ..quant.config import QuantConfig
from ..quant.qtensor import QTensor, pack_nibbles, unpack_nibbles
from ..shards import Piece, ReadFn, assemble_local, full_name, sharded_params
from .sharded import Checkpoint, pieces_of_tensor, shard_file, write_file, write_meta

QKINDS = ("qweight", "qscale", "qzero")


def _pieces(qt: QTensor, path: str, param: torch.Tensor):
    """``(full name, piece, QTensor of its rows)`` of a local quantized weight, padding dropped."""
    pieces = getattr(param, "pieces", None) or [Piece("", 0, 0, param.shape[0], param.shape[0])]
    if pieces[0].dim == 1:
        yield full_name(path, pieces[0].key), pieces[0], qt
        return
    offset = 0
    for pc in pieces:
        yield full_name(path, pc.key), pc, qt.rows(offset, offset + pc.stop - pc.start)
        offset += pc.length


def quantized_items(path: str, param: torch.Tensor, qt: QTensor
                    ) -> list[tuple[str, dict, torch.Tensor]]:
    """The ``(key, piece metadata, tensor)`` items that store local weight ``qt``."""
    items = []
    for name, pc, part in _pieces(qt, path, param):
        n = pc.full if pc.dim == 0 else param.shape[0]
        k = pc.full if pc.dim == 1 else param.shape[1]
        a, b = (pc.start, pc.stop) if pc.dim == 1 else (0, k)
        info = {"method": part.method, "group": part.group, "cols": k}
        int4 = part.method == "int4"
        if int4 and pc.dim == 1 and (a % 2 or (b % 2 and b != k)):
            raise ValueError(f"{name}: int4 columns [{a}, {b}) split a byte of two values")
        packed = pack_nibbles(part.q) if int4 else part.q
        kq = -(-k // 2) if int4 else k
        groups = -(-k // part.group)

        def meta(cols: int, c0: int, c1: int) -> dict:
            if pc.dim == 0:
                return dict(info, shape=[n, cols], dim=0, start=pc.start, stop=pc.stop)
            return dict(info, shape=[n, cols], dim=1, start=c0, stop=c1)
        items.append((f"qweight/{name}", meta(kq, a // 2 if int4 else a,
                                              -(-b // 2) if int4 else b), packed))
        g0, g1 = a // part.group, -(-b // part.group)
        items.append((f"qscale/{name}", meta(groups, g0, g1), part.scale))
        if part.zero is not None:
            items.append((f"qzero/{name}", meta(groups, g0, g1), part.zero))
    return items


def quantized_reader(ck: Checkpoint) -> QReadFn:
    """A :data:`~shardwise.quant.load.QReadFn` over a quantized checkpoint: the stored integers
    and scales of any rows or columns, as a :class:`QTensor` (the stored method and group)."""
    q_read, s_read, z_read = (ck.reader(k) for k in QKINDS)

    def qread(name: str, shape: tuple, dim: int, start: int, stop: int, method: str,
              group: int) -> QTensor:
        parts = ck.index.get(("qweight", name))
        if not parts:  # stored dense (a source type that is not kept quantized)
            return ck.reader("param")(name, shape, dim, start, stop)
        info = parts[0].info
        m, g, k = info["method"], info["group"], info["cols"]
        if (parts[0].shape[0], k) != tuple(shape):
            raise ValueError(f"{name!r} is ({parts[0].shape[0]}, {k}) in checkpoint {ck.dir} but "
                             f"the model expects {tuple(shape)}: a different model config")
        n, groups, kq = shape[0], -(-k // g), (-(-k // 2) if m == "int4" else k)
        if dim == 0:
            q = q_read(name, (n, kq), 0, start, stop)
            s = s_read(name, (n, groups), 0, start, stop)
            z = z_read(name, (n, groups), 0, start, stop) if m == "int4" else None
            q = unpack_nibbles(q, k) if m == "int4" else q
            return QTensor(m, q, s, z, g)
        g0, g1 = start // g, -(-stop // g)
        s = s_read(name, (n, groups), 1, g0, g1)
        z = z_read(name, (n, groups), 1, g0, g1) if m == "int4" else None
        if m == "int4":
            q = unpack_nibbles(q_read(name, (n, kq), 1, start // 2, -(-stop // 2)),
                               2 * (-(-stop // 2) - start // 2))[:, start % 2:start % 2 + stop - start]
        else:
            q = q_read(name, (n, kq), 1, start, stop)
        return QTensor(m, q.contiguous(), s, z, g, start % g)
    return qread


def rank_items(cfg: LlamaConfig, quant: QuantConfig, *, tp: int, rank: int, layers: range,
               read: ReadFn, qread: QReadFn) -> list[tuple[str, dict, torch.Tensor]]:
    """Everything target rank ``rank`` of ``tp`` (holding ``layers``) stores: float parameters
    from ``read``, quantized weights from ``qread``; its stage built on the meta device."""
    from ..mesh import LayoutOnly
    from ..models.llama import LlamaForCausalLM
    model = LlamaForCausalLM(cfg, group=LayoutOnly(tp, rank), device="meta", layers=layers,
                             quant=quant)
    items = []
    for path, p, _ in sharded_params(model):
        if is_placeholder(p):
            value = assemble_quantized(path, p, qread)
            if isinstance(value, QTensor):
                items += quantized_items(path, p, value)
                continue
        else:
            value = assemble_local(path, p, read)
        items += list(pieces_of_tensor("param", path, p, value))
    return items


def write_quantized(tmp: Path, cfg: LlamaConfig, quant: QuantConfig, *, tp: int, pp: int,
                    read: ReadFn, qread: QReadFn, meta: dict, tokenizer) -> None:
    """Fill checkpoint directory ``tmp`` for layout (tp, pp): one file per target rank."""
    from ..partition import stage_layers
    files = {}
    for p in range(pp):
        for t in range(tp):
            items = rank_items(cfg, quant, tp=tp, rank=t, read=read, qread=qread,
                               layers=stage_layers(cfg.num_hidden_layers, pp, p))
            write_file(tmp / shard_file(p, 0, t), items)
            files[shard_file(p, 0, t)] = {"rank": p * tp + t, "pp": p, "dp": 0, "tp": t}
    write_meta(tmp, dict(meta, kind="model", quant=quant.to_json(), files=files,
                         layout={"tp": tp, "pp": pp, "dp": 1, "zero": 0}),
               cfg.to_hf(), tokenizer)
