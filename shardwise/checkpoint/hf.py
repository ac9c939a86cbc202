"""Read a Hugging Face checkpoint directory, each rank only its slice.

``config.json`` plus ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
:class:`SafetensorsReader` serves ``read(name, shape, dim, start, stop)`` (the
:data:`shardwise.shards.ReadFn` protocol) from the safetensors layout (an 8-byte header size, a
JSON header of dtypes, shapes and byte offsets, then the raw data) with positioned reads.

What is read and what is kept, per rank at tp=t:

* a split along the first dimension (q/k/v, gate/up, the embedding and the head: the rows a rank
  owns) is one contiguous range: exactly the kept bytes are read;
* a split along a later dimension (o_proj, down_proj: columns) is strided in the file. It is read
  as whole rows in blocks of at most 4 MiB, keeping ``1/t`` of each row: the whole tensor is read.
  Reading only the kept columns takes one read per row (``benchmarks/load_strided.py`` measures
  both); for rows shorter than a page it saves no disk traffic either, since the kernel reads
  whole pages;
* replicated tensors (norms) are read whole.

``bytes_read`` counts the bytes actually read, ``bytes_kept`` the bytes the rank keeps. For
SmolLM2-135M at tp=3 each rank reads about 52% of the file and keeps 33%. Nothing is memory
mapped, so what is read and not kept does not stay resident. Files are written with
``safetensors``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from ..shards import assemble_local, sharded_params


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_CHUNK = 4 << 20  # column slices are read in row blocks of at most this many bytes
WRAPPED = (("model.", "language_model.model."), ("model.", "model.language_model."),
           ("lm_head.", "language_model.lm_head."))
"""Where a multimodal checkpoint keeps its language model's tensors (Gemma 3 4B and larger:
``Gemma3ForConditionalGeneration``, in transformers 4.x's and 5.x's names): tried, in order,
for a tensor the checkpoint does not hold under the decoder's own name."""


def _header(path: Path) -> tuple[int, dict]:
    """The safetensors header: ``(offset of the data, {name: {dtype, shape, data_offsets}})``."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        head = json.loads(f.read(n))
    head.pop("__metadata__", None)
    return 8 + n, head


class SafetensorsReader:
    """Reads rows ``[start, stop)`` along any dimension of a tensor in a safetensors file with
    positioned reads (row slices: exactly those bytes in one read; slices along a later
    dimension: whole rows in blocks of at most 4 MiB, keeping the slice). ``bytes_read`` and
    ``bytes_kept`` count what was read from the files and what was returned."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            files = sorted({self.directory / f for f in
                            json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {self.directory}")
        self.entries: dict[str, tuple[int, int, dict]] = {}  # name -> (fd, data offset, info)
        self._fds = []
        for f in files:
            base, head = _header(f)
            fd = os.open(f, os.O_RDONLY)
            self._fds.append(fd)
            for name, info in head.items():
                self.entries[name] = (fd, base, info)
        self.bytes_read = 0
        self.bytes_kept = 0

    def __contains__(self, name: str) -> bool:
        return self.resolve(name) in self.entries

    def resolve(self, name: str) -> str:
        """The checkpoint's name for tensor ``name`` (itself, or a :data:`WRAPPED` one)."""
        if name in self.entries:
            return name
        for ours, theirs in WRAPPED:
            if name.startswith(ours) and theirs + name[len(ours):] in self.entries:
                return theirs + name[len(ours):]
        return name

    def _pread(self, fd: int, offset: int, size: int) -> bytearray:
        buf = bytearray(size)
        view, done = memoryview(buf), 0
        while done < size:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"short read at byte {offset + done} of a checkpoint file")
            done += n
        self.bytes_read += size
        return buf

    def read(self, name: str, shape: tuple, dim: int, start: int, stop: int) -> torch.Tensor:
        name = self.resolve(name)
        if name not in self.entries:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint in {self.directory}")
        fd, base, info = self.entries[name]
        have = tuple(info["shape"])
        if have != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {have} in the checkpoint but the model "
                             f"expects {tuple(shape)}: the config does not match the weights")
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {info['dtype']}, which is not supported")
        dtype = _DTYPES[info["dtype"]]
        es = torch.empty((), dtype=dtype).element_size()
        begin = base + info["data_offsets"][0]
        if not have:
            out = torch.frombuffer(self._pread(fd, begin, es), dtype=dtype).reshape(())
        elif math.prod(have[:dim]) == 1:  # a contiguous range: one read
            inner = math.prod(have[1:]) * es  # bytes of one row
            raw = self._pread(fd, begin + start * inner, (stop - start) * inner)
            out = torch.frombuffer(raw, dtype=dtype).reshape((stop - start,) + have[1:]) if raw \
                else torch.empty((0,) + have[1:], dtype=dtype)
        else:
            out = self._strided(fd, begin, have, dim, start, stop, dtype, es)
        self.bytes_kept += out.numel() * es
        return out

    def _strided(self, fd: int, begin: int, have: tuple, dim: int, start: int, stop: int,
                 dtype: torch.dtype, es: int) -> torch.Tensor:
        """Rows ``[start, stop)`` along ``dim > 0``: whole outer blocks are read, in reads of at
        most 4 MiB, and the slice of each is kept."""
        outer = math.prod(have[:dim])           # blocks before the split dimension
        inner = math.prod(have[dim + 1:]) * es  # bytes of one index of the split dimension
        rows = stop - start
        out = torch.empty(have[:dim] + (rows,) + have[dim + 1:], dtype=dtype)
        flat = out.view(outer, -1)
        per = have[dim] * inner  # bytes of one outer block
        step = max(1, _CHUNK // per)
        for b0 in range(0, outer, step):
            b1 = min(outer, b0 + step)
            raw = self._pread(fd, begin + b0 * per, (b1 - b0) * per)
            block = torch.frombuffer(raw, dtype=torch.uint8).view(b1 - b0, have[dim], inner)
            # (blocks, rows kept, bytes per index)
            flat[b0:b1].view(torch.uint8).view(b1 - b0, rows, inner).copy_(block[:, start:stop])
        return out

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


@torch.no_grad()
def load_weights(model: nn.Module, directory: str | Path) -> dict[str, int]:
    """Fill every parameter of ``model`` with its rows from the checkpoint; returns
    ``{"bytes_read": ..., "bytes_kept": ..., "tensors": ...}`` (read from the files, kept in
    the parameters before padding). A tied output layer reads nothing of its own."""
    reader = SafetensorsReader(directory)
    n = 0
    try:
        for path, p, _ in sharded_params(model):
            p.copy_(assemble_local(path, p, reader.read).to(p.dtype))
            n += 1
    finally:
        reader.close()
    return {"bytes_read": reader.bytes_read, "bytes_kept": reader.bytes_kept, "tensors": n}
