"""Run a module sharded over tp ranks and unsharded in one process, and compare.

Worker side: :func:`run_case` builds the module on a TP group of the first ``tp`` ranks of the pool
(ranks >= tp only take part in group creation), initialises it with a tp-independent seed, runs
forward and backward under a ledger, and returns local outputs, input grads and parameter grads.
Parent side: :func:`reference` does the same in one process with no group; :func:`compare` checks
outputs, input gradients and each rank's slice of every weight gradient.
"""
from __future__ import annotations

import torch

from shardwise import comm
from shardwise.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                              finalize_grads)
from shardwise.loss import vocab_parallel_cross_entropy
from shardwise.mesh import group_rank, group_size, subgroup
from shardwise.models.config import LlamaConfig
from shardwise.models.llama import MLP, DecoderLayer, LlamaForCausalLM, rope_frequencies
from shardwise.shards import assemble_local, init_weights, split_local


def build(case: dict, group):
    kind, kw, sp = case["kind"], dict(case.get("kw", {})), case.get("sp", False)
    if kind == "column":
        return ColumnParallelLinear(kw["in"], kw["out"], group=group, bias=kw.get("bias", False),
                                    gather_output=kw.get("gather", False), sequence_parallel=sp)
    if kind == "row":
        return RowParallelLinear(kw["in"], kw["out"], group=group, bias=kw.get("bias", False),
                                 input_is_parallel=kw.get("parallel", True), sequence_parallel=sp)
    if kind == "embedding":
        return VocabParallelEmbedding(kw["vocab"], kw["dim"], group=group, sequence_parallel=sp)
    cfg = LlamaConfig(**kw)
    if kind == "mlp":
        return MLP(cfg, group, sequence_parallel=sp)
    if kind == "layer":
        return LayerWithRope(cfg, group, sp)
    if kind == "model":
        return LlamaForCausalLM(cfg, group=group, sequence_parallel=sp)
    raise ValueError(kind)


class LayerWithRope(torch.nn.Module):
    """A decoder layer fed with rotary tables for positions 0..s-1 (s = the full sequence)."""

    def __init__(self, cfg, group, sp):
        super().__init__()
        self.layer = DecoderLayer(cfg, 0, group, sequence_parallel=sp)
        self.inv_freq = rope_frequencies(cfg)
        self.scale = group_size(group) if sp else 1

    def forward(self, x):
        s = x.shape[1] * self.scale
        ang = torch.arange(s).float()[None, :, None] * self.inv_freq
        ang = torch.cat((ang, ang), -1).unsqueeze(1)
        return self.layer(x, ang.cos(), ang.sin())


def inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, r): the full input and the full weights ``r`` of the scalar ``sum(out * r)``."""
    g = torch.Generator().manual_seed(case.get("seed", 0) + 1)
    kind, kw = case["kind"], case.get("kw", {})
    b, s = case.get("batch", 2), case.get("seq", 8)
    if kind in ("embedding", "model"):
        vocab = kw.get("vocab", kw.get("vocab_size"))
        x = torch.randint(0, vocab, (b, s), generator=g)
        width = kw.get("dim", vocab) if kind == "embedding" else vocab
    else:
        x = torch.randn(b, s, kw.get("in", kw.get("hidden_size")), generator=g)
        width = kw.get("out", kw.get("hidden_size"))
    r = torch.randn(b, s, width, generator=g)
    return x, r


def out_layout(case: dict) -> str:
    kind, kw, sp = case["kind"], case.get("kw", {}), case.get("sp", False)
    if kind == "column":
        return "full" if kw.get("gather") else "last"
    if kind == "model":
        return "last"
    return "seq" if sp else "full"


def in_layout(case: dict) -> str:
    kind, kw, sp = case["kind"], case.get("kw", {}), case.get("sp", False)
    if kind == "row" and kw.get("parallel", True):
        return "last"
    if kind in ("embedding", "model"):
        return "ids"
    if sp and kind != "row":
        return "seq"
    return "full"


def _local(t: torch.Tensor, layout: str, sizes: list[int], rank: int) -> torch.Tensor:
    if layout == "seq":
        return t.chunk(len(sizes), dim=1)[rank].contiguous()
    if layout == "last":
        start = sum(sizes[:rank])
        return t[..., start:start + sizes[rank]].contiguous()
    return t


def _loss(case, module, out, r):
    if case.get("loss"):  # vocab-parallel cross-entropy instead of sum(out * r)
        head = module.lm_head
        tgt = case["_targets"]
        return vocab_parallel_cross_entropy(out, tgt, group=head.group, vocab_start=head.start,
                                            vocab_size=head.num_embeddings,
                                            label_smoothing=case.get("smoothing", 0.0))
    return (out * r).sum()


def run_case(case: dict, tp: int) -> dict | None:
    """Worker side (every rank of the pool calls it)."""
    group = subgroup(list(range(tp)))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank >= tp:
        return None
    torch.manual_seed(0)
    module = build(case, group)
    init_weights(module, seed=case.get("seed", 0))
    x, r = inputs(case)
    t, me = group_size(group), group_rank(group)
    # input and output split sizes as the module sees them
    in_sizes = getattr(module, "split_sizes", None) or [x.shape[-1] // t] * t
    x_local = x if in_layout(case) == "ids" else _local(x, in_layout(case), in_sizes, me)
    x_local = x_local.clone().requires_grad_(x_local.is_floating_point())
    with comm.Ledger() as fwd:
        out = module(x_local)
    out_sizes = [o[-1] for o in _all_shapes(out, group)]
    r_full = torch.nn.functional.pad(r, (0, sum(out_sizes) - r.shape[-1])) \
        if out_layout(case) == "last" else r
    r_local = _local(r_full, out_layout(case), out_sizes, me)
    case = dict(case, _targets=_targets(case))
    loss = _loss(case, module, out, r_local)
    with comm.Ledger() as bwd:
        loss.backward()
    with comm.Ledger() as fin:
        finalize_grads(module, group)
    return {"out": out.detach(), "loss": loss.detach(), "out_sizes": out_sizes,
            "dx": x_local.grad if x_local.requires_grad else None,
            "grads": {n: p.grad for n, p in module.named_parameters()},
            "params": {n: p.detach() for n, p in module.named_parameters()},
            "pieces": {n: getattr(p, "pieces", None) for n, p in module.named_parameters()},
            "fwd": fwd.counts(), "bwd": bwd.counts(), "fin": fin.counts()}


def _all_shapes(out: torch.Tensor, group) -> list[torch.Size]:
    t = group_size(group)
    if t == 1:
        return [out.shape]
    n = torch.tensor([out.shape[-1]])
    ns = [torch.zeros_like(n) for _ in range(t)]
    torch.distributed.all_gather(ns, n, group=group)
    return [torch.Size(list(out.shape[:-1]) + [int(v)]) for v in ns]


def _targets(case: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(case.get("seed", 0) + 7)
    vocab = case["kw"].get("vocab_size", 1)
    tgt = torch.randint(0, vocab, (case.get("batch", 2), case.get("seq", 8)), generator=g)
    tgt[0, :2] = -100  # exercise ignore_index
    return tgt


def reference(case: dict) -> dict:
    return run_case(case, 1)


def assemble(outs: list[torch.Tensor], layout: str, width: int | None = None) -> torch.Tensor:
    if layout == "seq":
        return torch.cat(outs, dim=1)
    if layout == "last":
        full = torch.cat(outs, dim=-1)
        return full[..., :width] if width else full
    return outs[0]


def compare(case: dict, results: list[dict | None], ref: dict, *, atol: float) -> None:
    results = [r for r in results if r is not None]
    tp = len(results)
    width = ref["out"].shape[-1]
    out = assemble([r["out"] for r in results], out_layout(case), width)
    if out_layout(case) == "full":  # replicated outputs must agree across ranks exactly-ish
        for r in results[1:]:
            torch.testing.assert_close(r["out"], results[0]["out"], atol=atol, rtol=0)
    torch.testing.assert_close(out, ref["out"], atol=atol, rtol=0, msg=lambda m: f"out tp={tp}: {m}")
    partial = out_layout(case) in ("last", "seq") and not case.get("loss")
    loss = sum(r["loss"] for r in results) if partial else results[0]["loss"]
    torch.testing.assert_close(loss, ref["loss"], atol=atol * 10, rtol=1e-6)
    if ref["dx"] is not None:
        lay = in_layout(case)
        dx = assemble([r["dx"] for r in results], lay) if lay in ("seq", "last") else results[0]["dx"]
        torch.testing.assert_close(dx, ref["dx"], atol=atol, rtol=0,
                                   msg=lambda m: f"input grad tp={tp}: {m}")
    full_grads = {}  # HF-named full tensors, split out of the reference's fused parameters
    for name, grad in ref["grads"].items():
        g = grad.clone()
        if ref["pieces"][name]:
            g.pieces = ref["pieces"][name]
        for fname, _, rows in split_local(name, g):
            full_grads[fname] = rows

    def read(name, shape, dim, start, stop):
        g = full_grads[name]
        assert tuple(g.shape) == tuple(shape), (name, g.shape, shape)
        return g.narrow(dim, start, stop - start) if g.dim() else g

    for rank, r in enumerate(results):
        for name, grad in r["grads"].items():
            local = r["params"][name].clone()
            if r["pieces"][name]:
                local.pieces = r["pieces"][name]
            expect = assemble_local(name, local, read)
            torch.testing.assert_close(grad, expect, atol=atol, rtol=0,
                                       msg=lambda m: f"grad of {name} on rank {rank}/tp={tp}: {m}")


def hf_model_worker(path: str, tp: int, ids: torch.Tensor, tgt: torch.Tensor,
                    sequence_parallel: bool = False):
    """Worker: the model of HF directory ``path`` at ``tp`` (ranks >= tp return None): full
    logits, the vocabulary-parallel loss, and every parameter's gradient with its pieces."""
    from shardwise.checkpoint.hf import load_weights
    from shardwise.layers import gather_logits
    group = subgroup(list(range(tp)))
    if torch.distributed.get_rank() >= tp:
        return None
    model = LlamaForCausalLM(LlamaConfig.from_hf(path), group=group,
                             sequence_parallel=sequence_parallel)
    load_weights(model, path)
    local = model(ids)
    head = model.lm_head
    loss = vocab_parallel_cross_entropy(local, tgt, group=group, vocab_start=head.start,
                                        vocab_size=head.num_embeddings)
    loss.backward()
    finalize_grads(model, group)
    return (gather_logits(local.detach(), head), loss.detach(),
            {n: (p.grad, getattr(p, "pieces", None)) for n, p in model.named_parameters()})


def hf_reference(model, ids: torch.Tensor, tgt: torch.Tensor):
    """A transformers model's logits, mean cross-entropy and gradients (by HF name)."""
    model.zero_grad()
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.view(-1))
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def compare_with_hf(result, reference, *, atol: float, where: str) -> None:
    """One rank's :func:`hf_model_worker` result against :func:`hf_reference`: logits, loss and
    the rank's slice of every gradient."""
    logits, loss, grads = reference
    got_logits, got_loss, got_grads = result

    def read(n, shape, dim, start, stop):
        return grads[n].narrow(dim, start, stop - start)

    torch.testing.assert_close(got_logits, logits, atol=atol, rtol=0,
                               msg=lambda m: f"{where} logits: {m}")
    torch.testing.assert_close(got_loss, loss, atol=atol, rtol=0, msg=lambda m: f"{where}: {m}")
    for n, (grad, pieces) in got_grads.items():
        local = grad.clone()
        if pieces:
            local.pieces = pieces
        torch.testing.assert_close(grad, assemble_local(n, local, read), atol=atol, rtol=0,
                                   msg=lambda m: f"{where} grad {n}: {m}")
