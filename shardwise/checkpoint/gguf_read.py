"""Read a rank's slice of a GGUF file's tensors directly, kept quantized.

llama.cpp stores a weight ``(n, k)`` row by row, each row as ``k / 32`` blocks:

    Q4_0  18 B: d (fp16), 16 bytes of nibbles      w = d (q - 8)       -> int4  s = d, z = 0
    Q4_1  20 B: d, m (fp16), 16 bytes of nibbles   w = d q + m         -> int4  s = d, z = m + 8 d
    Q8_0  34 B: d (fp16), 32 int8                  w = d q             -> int8 in groups of 32

(a block's nibbles: element j in the low half of byte j, element j + 16 in the high half.) The
right column is the :class:`~shardwise.quant.qtensor.QTensor` each becomes, exactly: d and m are
fp16, so ``m + 8 d`` is exact in fp32; the runtime rounds s and z to the activation dtype (bf16:
8 significant bits, a relative change of at most 2^-9 in each), which is the only difference
from gguf's own dequantization.

A rank reads only its blocks, with positioned reads: its rows (q/k/v, gate/up, vocabulary rows:
one contiguous range) or, per row, its block columns (o_proj, down_proj). Q8_0 either keeps its
blocks (``q8_0="block"``) or is re-quantized per row for torch's per-channel int8 kernel
(``"channel"``, the default: the change is reported). Q4 blocks in an int8 slot (``--quant
int8``: ``q4_to_int8``) are re-quantized per row; otherwise a GGUF's types decide, whatever
the slot (a Q4_1 embedding stays int4). F32/F16/BF16 weights are quantized on load like any float
checkpoint; any other type (K-quants, IQ) is dequantized with gguf's own code and kept dense in
the activation dtype (bf16 when serving in bf16), with a one-line notice.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..quant.load import quantizing_reader
from ..quant.qtensor import QTensor, quantize
from .gguf import _arch, _field, _hf_config, _open, hf_tensor_name, unpermute_qk_from_gguf
from .gguf_config import LONGROPE_TENSORS, ROPE_FREQS

KEPT = ("Q4_0", "Q4_1", "Q8_0")
FLOAT = ("F32", "F16", "BF16")
CHUNK_ROWS = 256  # rows converted at a time: bounds the transient memory of big tensors
TABLE = "gguf_tensors.json"  # the tensor table, written beside a converted GGUF's config


@dataclass(frozen=True)
class _Tensor:
    kind: str            # GGML type name
    shape: tuple         # HF shape: (n, k) or (n,)
    offset: int          # of the data in the file
    row_bytes: int
    block: int           # elements per block
    block_bytes: int
    heads: int           # > 0: rows permuted by llama.cpp for rope, over this many heads
    plus_one: bool = False  # a norm stored as 1 + w (Gemma): read back as w


class GGUFTensors:
    """``read`` (a float :data:`~shardwise.shards.ReadFn`) and ``qread`` (a
    :data:`~shardwise.quant.load.QReadFn`) over a GGUF file's tensors, by their HF names.
    ``bytes_read`` counts the bytes read from the file."""

    def __init__(self, path: str | os.PathLike, *, q8_0: str = "channel", q4_to_int8: bool = False,
                 table: str | os.PathLike | None = None) -> None:
        self.path, self.q8_0, self.q4_to_int8 = Path(path), q8_0, q4_to_int8
        if table is not None and Path(table).is_file():  # parsed once, at conversion
            meta = json.loads(Path(table).read_text())
        else:  # parsing every key of a GGUF takes seconds (its vocabulary)
            meta = tensor_table(_open(self.path), self.path)
        self.tensors = {name: _Tensor(e["kind"], tuple(e["shape"]), e["offset"], e["row_bytes"],
                                      e["block"], e["block_bytes"], e["heads"],
                                      e.get("plus_one", False))
                        for name, e in meta["tensors"].items()}
        self.head_dim = meta["head_dim"]
        self.bytes_read = 0
        self._fd = os.open(self.path, os.O_RDONLY)
        self._float = quantizing_reader(self.read)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _entry(self, name: str, shape: tuple) -> _Tensor:
        if name not in self.tensors:
            raise KeyError(f"tensor {name!r} is missing from {self.path.name}")
        e = self.tensors[name]
        if tuple(e.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {e.shape} in {self.path.name} but the "
                             f"model expects {tuple(shape)}: the config does not match the weights")
        return e

    def _pread(self, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read at byte {offset} of {self.path}")
        self.bytes_read += size
        return data

    def _raw(self, e: _Tensor, r0: int, r1: int, b0: int, b1: int) -> np.ndarray:
        """Blocks ``[b0, b1)`` of rows ``[r0, r1)``: (rows, (b1 - b0) * block_bytes) bytes."""
        width = (b1 - b0) * e.block_bytes
        if b0 == 0 and width == e.row_bytes:  # whole rows: one read
            buf = self._pread(e.offset + r0 * e.row_bytes, (r1 - r0) * e.row_bytes)
        else:                                 # a range of each row: one read per row
            buf = b"".join(self._pread(e.offset + r * e.row_bytes + b0 * e.block_bytes, width)
                           for r in range(r0, r1))
        return np.frombuffer(buf, dtype=np.uint8).reshape(r1 - r0, width)

    def _row_order(self, e: _Tensor, start: int, stop: int) -> torch.Tensor | None:
        """For llama.cpp's permuted q/k: which stored row each HF row of ``[start, stop)`` is."""
        if not e.heads:
            return None
        d = self.head_dim
        if start % d or stop % d:
            raise ValueError(f"rows [{start}, {stop}) of a rope-permuted tensor must be whole "
                             f"heads of {d}")
        idx = torch.arange(stop - start).view(-1, 1)
        return unpermute_qk_from_gguf(idx, (stop - start) // d).flatten()

    # ------------------------------------------------------------------ float reads
    def read(self, name: str, shape: tuple, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` along ``dim`` as fp32 (gguf's own dequantization)."""
        import gguf
        e = self._entry(name, shape)
        if len(e.shape) == 1:
            raw = self._raw(e, 0, 1, start // e.block, -(-stop // e.block))
            vals = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[e.kind]).reshape(-1)
            first = (start // e.block) * e.block
            out = torch.from_numpy(np.array(vals[start - first:stop - first], np.float32))
            return out - 1 if e.plus_one else out
        r0, r1, c0, c1 = (start, stop, 0, e.shape[1]) if dim == 0 else (0, e.shape[0], start, stop)
        b0, b1 = c0 // e.block, -(-c1 // e.block)
        raw = self._raw(e, r0, r1, b0, b1)
        vals = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[e.kind])  # (rows, cols)
        out = torch.from_numpy(np.array(vals, np.float32))[:, c0 - b0 * e.block:c1 - b0 * e.block]
        order = self._row_order(e, r0, r1)
        return out if order is None else out[order]

    # ------------------------------------------------------------------ quantized reads
    def qread(self, name: str, shape: tuple, dim: int, start: int, stop: int, method: str,
              group: int) -> QTensor | torch.Tensor:
        e = self._entry(name, shape)
        if e.kind in FLOAT:
            return self._float(name, shape, dim, start, stop, method, group)
        if e.kind not in KEPT:  # dense: gguf's dequantization, then the model's dtype
            return self.read(name, shape, dim, start, stop)
        requantize = (e.kind == "Q8_0" and self.q8_0 == "channel") or \
            (e.kind != "Q8_0" and self.q4_to_int8)
        r0, r1, c0, c1 = (start, stop, 0, e.shape[1]) if dim == 0 else (0, e.shape[0], start, stop)
        if requantize:
            c0, c1 = 0, e.shape[1]  # per-row scales need whole rows
        b0, b1 = c0 // e.block, -(-c1 // e.block)
        qt, err, top = None, 0.0, 0.0
        for r in range(r0, r1, CHUNK_ROWS):  # into one preallocated tensor, chunk by chunk
            part = _decode(e.kind, self._raw(e, r, min(r1, r + CHUNK_ROWS), b0, b1), e.block)
            if requantize:
                exact = part.dequantize()
                part = quantize(exact, "int8")
                err = max(err, float((part.dequantize() - exact).abs().max()))
                top = max(top, float(exact.abs().max()))
            if qt is None:
                qt = _empty_like(part, r1 - r0)
            _fill(qt, part, r - r0)
        if dim == 1:
            qt = qt.cols(start - b0 * e.block, stop - b0 * e.block)
        order = self._row_order(e, r0, r1)
        if order is not None:
            qt = _take_rows(qt, order)
        if requantize:
            qt.notes.append(f"{e.kind} re-quantized to int8 per row: largest change {err:.3g} "
                            f"({100 * err / max(top, 1e-30):.2f}% of the largest |w|)")
        return qt


def tensor_table(reader, path: Path) -> dict:
    """Where each tensor of a GGUF is (HF name -> type, HF shape, offset, bytes per row, block
    size and bytes, rope-permuted heads), and the head dimension: JSON, cached beside the
    converted config (:data:`TABLE`)."""
    import gguf
    arch = _arch(reader, path)
    cfg = _hf_config(reader, _field(reader, "general.architecture"), arch, torch.float32)
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    out = {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name, arch)
        if t.name in (ROPE_FREQS, *LONGROPE_TENSORS) or name is None:
            continue
        block, block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
        shape = [int(n) for n in reversed(t.shape)]
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        out[name] = {"kind": t.tensor_type.name, "shape": shape, "offset": int(t.data_offset),
                     "row_bytes": shape[-1] // block * block_bytes, "block": block,
                     "block_bytes": block_bytes,
                     "heads": heads[kind] if arch.gguf.permute_qk and kind in heads else 0,
                     "plus_one": bool(arch.gguf.norm_plus_one and name.endswith("norm.weight"))}
    return {"tensors": out, "head_dim": cfg["head_dim"]}


def _decode(kind: str, raw: np.ndarray, block: int) -> QTensor:
    """Blocks (rows, blocks x bytes) -> the exact QTensor (groups of ``block``)."""
    rows = raw.shape[0]
    b = raw.reshape(rows, -1, {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind])   # (rows, blocks, B)
    d = torch.from_numpy(b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    if kind == "Q8_0":
        q = torch.from_numpy(b[..., 2:].copy().view(np.int8)).reshape(rows, -1)
        return QTensor("int8", q, d, None, block)
    start = 4 if kind == "Q4_1" else 2
    qs = torch.from_numpy(b[..., start:start + 16].copy())                  # (rows, blocks, 16)
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(rows, -1)             # (rows, k)
    if kind == "Q4_1":
        m = torch.from_numpy(b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        return QTensor("int4", q, d, m + 8 * d, block)
    return QTensor("int4", q, d, torch.zeros_like(d), block)


def _empty_like(part: QTensor, rows: int) -> QTensor:
    """A QTensor of ``rows`` rows shaped and typed like ``part`` (filled by :func:`_fill`)."""
    new = lambda t: None if t is None else t.new_empty((rows,) + tuple(t.shape[1:]))  # noqa: E731
    return QTensor(part.method, new(part.q), new(part.scale), new(part.zero), part.group,
                   owned=True)


def _fill(qt: QTensor, part: QTensor, row: int) -> None:
    n = part.q.shape[0]
    qt.q[row:row + n] = part.q
    qt.scale[row:row + n] = part.scale
    if qt.zero is not None:
        qt.zero[row:row + n] = part.zero


def _take_rows(qt: QTensor, order: torch.Tensor) -> QTensor:
    from dataclasses import replace
    z = None if qt.zero is None else qt.zero[order]
    return replace(qt, q=qt.q[order], scale=qt.scale[order], zero=z)
