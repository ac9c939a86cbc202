"""Quantized layers and models run sharded over tp ranks and unsharded, for comparison.

Worker side: :func:`run_quant` builds the module with ``quant=`` on a TP group of the first ``tp``
ranks of the pool, fills it from seeded full float tensors quantized on the full tensor's grid
(:func:`shardwise.quant.load.quantizing_reader`), runs the forward in fp32 and returns the full
output (gathered) with what each quantized weight became (runtime form, its dequantized values
and the loader's notes).
"""
from __future__ import annotations

import os

import torch

from shardwise.layers import ColumnParallelLinear, RowParallelLinear, gather_logits
from shardwise.mesh import group_rank, group_size, subgroup
from shardwise.comm import all_gather_last
from shardwise.models.config import LlamaConfig
from shardwise.models.llama import LlamaForCausalLM
from shardwise.quant.kernels import QuantizedWeight
from shardwise.quant.load import load_quantized, quantizing_reader
from shardwise.quant.config import QuantConfig
from shardwise.shards import Piece, init_weights, seeded_reader


def build(case: dict, group):
    kind, kw = case["kind"], dict(case.get("kw", {}))
    quant = QuantConfig(**case["quant"])
    if kind == "column":
        return ColumnParallelLinear(kw["in"], kw["out"], group=group, bias=True,
                                    gather_output=True, quant=quant)
    if kind == "row":
        bounds = kw.get("bounds")  # explicit column boundaries (a head layout's), else aligned
        pieces = None
        if bounds:
            r = group_rank(group)
            pieces = [Piece("", 1, bounds[r], bounds[r + 1], kw["in"])]
        return RowParallelLinear(kw["in"], kw["out"], group=group, bias=True, in_pieces=pieces,
                                 input_is_parallel=bounds is not None, quant=quant)
    return LlamaForCausalLM(LlamaConfig(**kw), group=group, quant=quant)


def fill(module, *, seed: int = 0, std: float = 0.5) -> dict[str, list[str]]:
    """Float parameters and quantized weights from the same seeded full tensors."""
    init_weights(module, seed=seed, std=std)  # the float ones (placeholders are left alone)
    read = seeded_reader(seed=seed, std=std)
    return load_quantized(module, quantizing_reader(read), dtype=torch.float32)


def inputs(case: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    kw = case.get("kw", {})
    if case["kind"] == "model":
        return torch.randint(0, kw["vocab_size"], (2, 6), generator=g)
    return torch.randn(2, 5, kw["in"], generator=g)


def run_quant(case: dict, tp: int) -> dict | None:
    """Worker side (every rank of the pool calls it)."""
    group = subgroup(list(range(tp)))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank >= tp:
        return None
    if case.get("kernels"):  # "torch": torch's int8/int4 kernels instead of the native ones
        os.environ["SHARDWISE_QUANT_KERNELS"] = case["kernels"]
    else:
        os.environ.pop("SHARDWISE_QUANT_KERNELS", None)
    module = build(case, group).eval()
    notes = fill(module)
    x = inputs(case)
    bounds = case.get("kw", {}).get("bounds")
    if bounds:
        x = x[..., bounds[group_rank(group)]:bounds[group_rank(group) + 1]]
    with torch.no_grad():
        out = module(x)
        if case["kind"] == "model":
            out = gather_logits(out, module.lm_head)
        elif case["kind"] == "column":
            pass  # gathered by the layer
        elif group_size(group) > 1 and out.shape[-1] != case["kw"]["out"]:
            out = all_gather_last(out, group)
    weights = {n: m for n, m in module.named_modules() if isinstance(m, QuantizedWeight)}
    return {"rank": group_rank(group), "out": out, "notes": notes,
            "forms": {n: m.form for n, m in weights.items()},
            "values": {n: m.dequantize() for n, m in weights.items()},
            "pieces": {n: m.pieces for n, m in weights.items()}}


def reference(case: dict) -> dict:
    return run_quant(case, 1)


def run_source(spec: str, tp: int, quant: QuantConfig | None, ids: torch.Tensor,
               dtype: str = "float32") -> dict | None:
    """Worker side: ``spec`` (a GGUF, checkpoint, preset) built by ``build_model`` on the first
    ``tp`` ranks, full logits of ``ids``."""
    from shardwise.checkpoint.source import build_model, resolve
    group = subgroup(list(range(tp)))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank >= tp:
        return None
    model = build_model(resolve(spec, dense=quant is None), group=group, quant=quant,
                        dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        logits = gather_logits(model(ids), model.lm_head)
    forms = {n: m.form for n, m in model.named_modules() if isinstance(m, QuantizedWeight)}
    return {"rank": group_rank(group), "logits": logits.float(), "forms": forms}
