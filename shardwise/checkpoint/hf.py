"""Read a Hugging Face checkpoint directory, each rank only its slice.

``config.json`` plus ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
:class:`SafetensorsReader` serves ``read(name, shape, dim, start, stop)`` (the
:data:`shardwise.shards.ReadFn` protocol) with ``safe_open(...).get_slice(name)``: the file is
memory-mapped and only the requested rows are copied, so a rank's resident memory grows by its
share of the weights, not the whole model. It counts the bytes it hands out.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..shards import assemble_local, sharded_params


class SafetensorsReader:
    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            files = {n: self.directory / f for n, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            found = sorted(self.directory.glob("*.safetensors"))
            if not found:
                raise FileNotFoundError(f"no *.safetensors files in {self.directory}")
            files = {}
            for f in found:
                with safe_open(f, "pt") as h:
                    files.update({n: f for n in h.keys()})
        self.files = files
        self._open = {f: safe_open(f, "pt") for f in set(files.values())}
        self.bytes_read = 0

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str, shape: tuple, dim: int, start: int, stop: int) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint in {self.directory}")
        sl = self._open[self.files[name]].get_slice(name)
        have = tuple(sl.get_shape())
        if have != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {have} in the checkpoint but the model "
                             f"expects {tuple(shape)}: the config does not match the weights")
        if not have:
            out = sl[:]
        else:
            index = [slice(None)] * len(have)
            index[dim] = slice(start, stop)
            out = sl[tuple(index)]
        self.bytes_read += out.numel() * out.element_size()
        return out


@torch.no_grad()
def load_weights(model: nn.Module, directory: str | Path) -> dict[str, int]:
    """Fill every parameter of ``model`` with its rows from the checkpoint; returns
    ``{"bytes_read": ..., "tensors": ...}``. A tied output layer reads nothing of its own."""
    reader = SafetensorsReader(directory)
    n = 0
    for path, p, _ in sharded_params(model):
        p.copy_(assemble_local(path, p, reader.read).to(p.dtype))
        n += 1
    return {"bytes_read": reader.bytes_read, "tensors": n}
