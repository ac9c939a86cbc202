"""Fill a model's quantized weights, each rank with its slice on the full tensor's grid.

A layer built with ``quant=`` holds a placeholder ``weight`` (meta device) marked ``weight.quant
= (method, group)`` and carrying its pieces (:mod:`shardwise.shards`). :func:`load_quantized`
reads each placeholder's pieces through a :data:`QReadFn`, concatenates them, turns the result
into the runtime form (:func:`shardwise.quant.kernels.prepare`) and installs it as the layer's
``qweight``. Readers:

* :func:`quantizing_reader`: any float :data:`~shardwise.shards.ReadFn` (HF safetensors, a float
  sharded checkpoint, seeded random weights). A row slice is quantized as it is (groups run
  along the columns); a column slice ``[a, b)`` reads the whole groups it touches, quantizes
  them and keeps ``[a, b)`` (per-channel int8, ``group=0``, reads whole rows). So every rank
  holds exactly the values the unsharded quantized tensor has;
* a quantized sharded checkpoint (:mod:`shardwise.checkpoint.sharded`) and a GGUF file
  (:mod:`shardwise.checkpoint.gguf_read`) read their stored integers and scales directly.

A reader may return a dense tensor for a piece (a GGUF tensor of a type that is not kept
quantized): the weight is then installed dense, in the model's dtype, with a note.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn

from ..shards import ReadFn, full_name, full_shape, pieces_of
from .kernels import prepare
from .qtensor import QTensor, group_span, quantize, stack_rows

QReadFn = Callable[[str, tuple, int, int, int, str, int], "QTensor | torch.Tensor"]
"""``qread(name, full_shape, dim, start, stop, method, group)``: rows ``[start, stop)`` along
``dim`` of the full tensor ``name`` (shape ``(n, k)``), quantized with ``method`` in groups of
``group`` (the slot's wish: a source that stores the tensor quantized returns it as stored)."""


def quantizing_reader(read: ReadFn) -> QReadFn:
    """Quantize what a float reader returns, on the full tensor's grid (see the module doc)."""
    def qread(name: str, shape: tuple, dim: int, start: int, stop: int, method: str,
              group: int) -> QTensor:
        k = shape[1]
        g = group or k                                       # 0: one scale per row
        if dim == 0:
            return quantize(read(name, shape, 0, start, stop), method, group=g, search=True)
        a, b = group_span(start, stop, g, k)
        return quantize(read(name, shape, 1, a, b), method, group=g, search=True).cols(
            start - a, stop - a)
    return qread


def is_placeholder(p: torch.Tensor) -> bool:
    return getattr(p, "quant", None) is not None and p.is_meta


def placeholders(model: nn.Module) -> list[tuple[str, nn.Module, nn.Parameter]]:
    """``(parameter path, owning module, placeholder)`` for every weight still to be filled."""
    out = []
    for mpath, module in model.named_modules():
        p = module._parameters.get("weight")
        if p is not None and is_placeholder(p):
            out.append((f"{mpath}.weight" if mpath else "weight", module, p))
    return out


def assemble_quantized(path: str, param: torch.Tensor, qread: QReadFn
                       ) -> QTensor | torch.Tensor:
    """The rank's local quantized weight for placeholder ``param`` (pieces concatenated along
    rows, vocabulary padding as zero rows); dense when any piece comes back dense."""
    method, group = param.quant
    parts = []
    for pc in pieces_of(param) or []:
        part = qread(full_name(path, pc.key), full_shape(param, pc), pc.dim, pc.start, pc.stop,
                     method, group)
        parts.append((part, pc.pad))
    if not parts:
        n, k = param.shape
        parts = [(qread(path, (n, k), 0, 0, n, method, group), 0)]
    if pieces_of(param) and pieces_of(param)[0].dim == 1 and len(parts) > 1:
        raise NotImplementedError(f"{path}: several column pieces of a quantized weight")
    same = all(isinstance(p, QTensor) for p, _ in parts) and len(
        {(p.method, p.group, p.offset) for p, _ in parts}) == 1
    if same:
        return stack_rows([p for p, _ in parts], [pad for _, pad in parts])
    dense = [p.dequantize() if isinstance(p, QTensor) else p.float() for p, _ in parts]
    dense = [torch.cat([d, d.new_zeros(pad, d.shape[1])]) if pad else d
             for d, (_, pad) in zip(dense, parts)]
    return torch.cat(dense)


def install(module: nn.Module, placeholder: nn.Parameter, value: QTensor | torch.Tensor, *,
            dtype: torch.dtype, device, lookup: bool) -> list[str]:
    """Put ``value`` in ``module``: ``qweight`` (runtime form) or a dense ``weight``."""
    pieces = pieces_of(placeholder)
    if isinstance(value, QTensor):
        qw, notes = prepare(value, dtype=dtype, device=device, lookup=lookup, consume=True)
        qw.pieces = pieces
        del module.weight
        module.qweight = qw
        return value.notes + notes
    dense = nn.Parameter(value.to(dtype).to(device), requires_grad=False)
    if pieces is not None:
        dense.pieces = pieces
    module.weight = dense
    return []


@torch.no_grad()
def load_quantized(model: nn.Module, qread: QReadFn, *, dtype: torch.dtype,
                   device: torch.device | str = "cpu") -> dict[str, list[str]]:
    """Fill every placeholder of ``model``; returns the notes per weight (see the module doc)."""
    from ..layers import VocabParallelEmbedding
    notes: dict[str, list[str]] = {}
    for path, module, p in placeholders(model):
        value = assemble_quantized(path, p, qread)
        said = install(module, p, value, dtype=dtype, device=device,
                       lookup=isinstance(module, VocabParallelEmbedding))
        if not isinstance(value, QTensor):
            said = [f"kept dense in {str(dtype).removeprefix('torch.')}: its source type is not "
                    "kept quantized"] + said
        if said:
            notes[path] = said
        del value
        release_free_memory()
    return notes


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    A weight's transients (raw blocks, unpacked values, int32 packing chunks) are freed, but
    glibc keeps freed heap chunks mapped for reuse, and they count in the resident set: without
    this a rank's load peaks some 10 MiB above what it holds (``benchmarks/load_memory.py``)."""
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def say_notes(notes: dict[str, list[str]], *, rank: int, stream=None) -> None:
    """One line per kind of note (its text without numbers), naming the weights (layer numbers
    folded to ``*``) and quoting the note with the largest first number."""
    import re
    number = re.compile(r"\d+(\.\d+)?(e[-+]?\d+)?")
    kinds: dict[str, tuple[list[str], str]] = {}
    for path, said in notes.items():
        for line in dict.fromkeys(said):
            key = number.sub("#", line)
            paths, worst = kinds.get(key, ([], line))
            first = [float(m.group()) for m in number.finditer(line)][:1]
            was = [float(m.group()) for m in number.finditer(worst)][:1]
            paths.append(re.sub(r"\.\d+\.", ".*.", path))
            kinds[key] = (paths, line if first > was else worst)
    for paths, line in kinds.values():
        names = ", ".join(dict.fromkeys(paths))
        print(f"shardwise: rank {rank}: {names}: {line}", file=stream or sys.stderr, flush=True)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the quantized weights' runtime forms (what the loader holds)."""
    from .kernels import QuantizedWeight
    return sum(m.nbytes() for m in model.modules() if isinstance(m, QuantizedWeight))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as held: parameters plus runtime weight forms' buffers
    (quantized, or dense laid out in tiles)."""
    from ..kernels import WeightForm
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta) + \
        sum(m.nbytes() for m in model.modules() if isinstance(m, WeightForm))


def is_quantized(model: nn.Module) -> bool:
    from .kernels import QuantizedWeight
    return getattr(model, "quant", None) is not None or any(
        isinstance(m, QuantizedWeight) for m in model.modules())
