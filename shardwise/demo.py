"""``shardwise demo``: one tensor-parallel transformer block (attention + MLP) on local gloo
workers, forward and backward, against the same block unsharded in one process.

Prints the largest differences (output, input gradient, every rank's weight-gradient slice) and
the collectives each pass used; exits non-zero when a difference exceeds the tolerance.
"""
from __future__ import annotations

import torch

from .comm import Ledger
from .layers import finalize_grads
from .mesh import Mesh
from .models.config import LlamaConfig
from .models.llama import DecoderLayer, rope_frequencies
from .shards import assemble_local, init_weights, split_local

CFG = LlamaConfig(vocab_size=64, hidden_size=72, intermediate_size=200, num_hidden_layers=1,
                  num_attention_heads=9, num_key_value_heads=3)
TOLERANCE = 1e-5


def _run(group, tp: int) -> dict:
    torch.manual_seed(0)
    block = DecoderLayer(CFG, 0, group)
    init_weights(block, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, CFG.hidden_size, generator=g).requires_grad_()
    r = torch.randn(2, 16, CFG.hidden_size, generator=g)
    ang = torch.arange(16).float()[None, :, None] * rope_frequencies(CFG)
    ang = torch.cat((ang, ang), -1).unsqueeze(1)
    with Ledger() as fwd:
        y = block(x, ang.cos(), ang.sin())
    with Ledger() as bwd:
        (y * r).sum().backward()
        finalize_grads(block, group)
    grads = {name: p.grad for name, p in block.named_parameters()}
    pieces = {name: getattr(p, "pieces", None) for name, p in block.named_parameters()}
    return {"y": y.detach(), "dx": x.grad, "grads": grads, "pieces": pieces,
            "fwd": fwd.counts(), "bwd": bwd.counts()}


def _with_pieces(t: torch.Tensor, pieces) -> torch.Tensor:
    t = t.clone()  # tensor attributes do not survive pickling between processes
    if pieces:
        t.pieces = pieces
    return t


def worker(tp: int) -> dict:
    mesh = Mesh.init(tp=tp)
    return _run(mesh.tp_group, tp)


def main(tp: int = 2) -> int:
    from .launch import spawn
    ref = _run(None, 1)
    full = {}
    for name, g in ref["grads"].items():
        for fname, _, rows in split_local(name, _with_pieces(g, ref["pieces"][name])):
            full[fname] = rows
    results = spawn(worker, tp, tp)
    worst = 0.0

    def read(name, shape, dim, start, stop):
        return full[name].narrow(dim, start, stop - start) if full[name].dim() else full[name]

    print(f"tensor-parallel block (9 query heads, 3 KV heads, hidden 72) on {tp} gloo ranks vs "
          "one process")
    for rank, res in enumerate(results):
        d_out = (res["y"] - ref["y"]).abs().max().item()
        d_in = (res["dx"] - ref["dx"]).abs().max().item()
        d_w = max((g - assemble_local(n, _with_pieces(g, res["pieces"][n]), read))
                  .abs().max().item() for n, g in res["grads"].items())
        worst = max(worst, d_out, d_in, d_w)
        print(f"  rank {rank}: max |diff| output {d_out:.2e}, input grad {d_in:.2e}, "
              f"weight-grad slices {d_w:.2e}")
    print(f"  collectives per rank: forward {results[0]['fwd']}, backward {results[0]['bwd']}")
    ok = worst <= TOLERANCE
    print(f"  largest difference {worst:.2e} {'<=' if ok else '>'} tolerance {TOLERANCE:.0e}: "
          f"{'OK' if ok else 'FAILED'}")
    return 0 if ok else 1
