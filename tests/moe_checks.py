"""Run a mixture-of-experts module over tp x ep ranks and in one process, and compare.

Layout: ranks ``0 .. tp x ep - 1`` of the pool form ``ep`` TP groups of ``tp`` neighbours
(``arange(tp x ep).view(ep, tp)``, the mesh's order); EP groups are the columns. EP group ``j``
runs batch rows ``[j b, (j + 1) b)`` of the full input; under sequence parallelism each TP rank
holds its piece of the sequence. The scalar is ``sum(out * r) + coef x aux`` where ``aux`` is the
rank's share of the load-balancing loss, so that the shares and the per-rank sums add up to the
one-process loss.

Worker side: :func:`run_case`; parent side: :func:`reference` (the same case in one process) and
:func:`compare` (outputs, input gradients, each rank's slice of every weight gradient, the
router's gradient summed over the ranks, the loss).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from shardwise import comm
from shardwise.layers import finalize_grads
from shardwise.mesh import subgroup
from shardwise.models.moe import ExpertParallel, MoEBlock, MoEConfig, load_balancing_loss
from shardwise.shards import assemble_local, init_weights, split_local


def groups(tp: int, ep: int):
    """Every pool rank creates every group in the same order; returns (member, tp, ep groups,
    ep rank, tp rank)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    grid = torch.arange(tp * ep).view(ep, tp)
    tp_g = ep_g = None
    for row in grid.tolist():
        g = subgroup(row)
        tp_g = g if rank in row else tp_g
    for col in grid.t().tolist():
        g = subgroup(col)
        ep_g = g if rank in col else ep_g
    return rank < tp * ep, tp_g, ep_g, rank // tp, rank % tp


def build(case: dict, tp_g, ep_g):
    kw = dict(case["cfg"])
    cfg = MoEConfig(**kw)
    return MoEBlock(cfg, tp_g, experts=ExpertParallel(ep_g, case.get("expert_tp")),
                    sequence_parallel=case.get("sp", False))


def inputs(case: dict, ep: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(case.get("seed", 0) + 1)
    h = case["cfg"]["hidden_size"]
    shape = (case.get("batch", 1) * ep, case.get("seq", 8), h)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _mine(t: torch.Tensor, case: dict, ep_rank: int, tp_rank: int, tp: int) -> torch.Tensor:
    b = case.get("batch", 1)
    t = t[ep_rank * b:(ep_rank + 1) * b]
    if case.get("sp"):
        t = t.chunk(tp, dim=1)[tp_rank]
    return t.contiguous()


def run_case(case: dict, tp: int, ep: int) -> dict | None:
    """Worker side (every rank of the pool calls it); ``tp = ep = 1`` is the reference."""
    member, tp_g, ep_g, ep_rank, tp_rank = groups(tp, ep)
    if not member:
        return None
    module = build(case, tp_g, ep_g)
    init_weights(module, seed=case.get("seed", 0), std=case.get("std", 0.3))
    x, r = inputs(case, case["ep_ref"] if tp == ep == 1 else ep)
    if tp == ep == 1:
        ep_rank = 0
        case = dict(case, batch=x.shape[0])
    x = _mine(x, case, ep_rank, tp_rank, tp).requires_grad_()
    r = _mine(r, case, ep_rank, tp_rank, tp)
    with comm.Ledger() as fwd:
        out = module(x)
    with comm.Ledger() as aux_ledger:
        share, value = load_balancing_loss(module, group=ep_g)
    loss = (out * r).sum() + case.get("coef", 0.1) * share
    with comm.Ledger() as bwd:
        loss.backward()
    finalize_grads(module, tp_g)
    router = module.gate.weight.grad.clone()
    if ep_g is not None:
        dist.all_reduce(router, group=ep_g)
    return {"out": out.detach(), "dx": x.grad, "loss": loss.detach(), "aux": value,
            "router": router, "experts": list(module.experts),
            "grads": {n: p.grad for n, p in module.named_parameters()},
            "params": {n: p.detach() for n, p in module.named_parameters()},
            "pieces": {n: getattr(p, "pieces", None) for n, p in module.named_parameters()},
            "fwd": fwd.counts(), "aux_calls": aux_ledger.counts(), "bwd": bwd.counts(),
            "where": (ep_rank, tp_rank)}


def reference(case: dict, ep: int) -> dict:
    return run_case(dict(case, ep_ref=ep), 1, 1)


def compare(case: dict, results: list[dict | None], ref: dict, tp: int, ep: int, *,
            atol: float) -> None:
    results = [r for r in results if r is not None]
    tag = f"tp={tp} ep={ep} expert_tp={case.get('expert_tp')} sp={case.get('sp', False)}"
    assert len(results) == tp * ep, tag
    for res in results:
        j, t = res["where"]
        expect_out = _mine(ref["out"], case, j, t, tp)
        expect_dx = _mine(ref["dx"], case, j, t, tp)
        torch.testing.assert_close(res["out"], expect_out, atol=atol, rtol=0,
                                   msg=lambda m: f"out {tag} rank {res['where']}: {m}")
        torch.testing.assert_close(res["dx"], expect_dx, atol=atol, rtol=0,
                                   msg=lambda m: f"dx {tag} rank {res['where']}: {m}")
        torch.testing.assert_close(res["router"], ref["router"], atol=atol, rtol=0,
                                   msg=lambda m: f"router grad {tag}: {m}")
        assert abs(res["aux"] - ref["aux"]) < 1e-6, (tag, res["aux"], ref["aux"])
    _compare_grads(results, ref, tag, atol)


def _compare_grads(results: list[dict], ref: dict, tag: str, atol: float) -> None:
    full = {}
    for name, grad in ref["grads"].items():
        g = grad.clone()
        if ref["pieces"][name]:
            g.pieces = ref["pieces"][name]
        for fname, _, rows in split_local(name, g):
            full[fname] = rows

    def read(name, shape, dim, start, stop):
        g = full[name]
        assert tuple(g.shape) == tuple(shape), (name, g.shape, shape)
        return g.narrow(dim, start, stop - start)

    held = set()
    for res in results:
        held.update(res["experts"])
        for name, grad in res["grads"].items():
            if name == "gate.weight":
                continue  # partial per rank: compared summed
            local = res["params"][name].clone()
            local.pieces = res["pieces"][name]
            torch.testing.assert_close(grad, assemble_local(name, local, read), atol=atol,
                                       rtol=0, msg=lambda m: f"grad {name} {tag}: {m}")
    assert held == set(ref["experts"]), f"{tag}: experts held {sorted(held)}"


# ------------------------------------------------------------------------ whole models
def model_case(path: str, tp: int, ep: int, ids: torch.Tensor, tgt: torch.Tensor, coef: float,
               expert_tp: int | None = None, sp: bool = False) -> dict | None:
    """Worker: the HF checkpoint at ``path`` over tp x ep ranks; EP group j runs rows
    ``[j b, (j+1) b)`` of ``ids``. The scalar is ``sum of token CE + coef x aux share``; the
    dense weights' gradients are summed over the EP group (as data parallelism would)."""
    from shardwise.checkpoint.hf import load_weights
    from shardwise.layers import gather_logits
    from shardwise.loss import vocab_parallel_cross_entropy
    from shardwise.models.config import LlamaConfig
    from shardwise.models.llama import LlamaForCausalLM
    member, tp_g, ep_g, j, _ = groups(tp, ep)
    if not member:
        return None
    model = LlamaForCausalLM(LlamaConfig.from_hf(path), group=tp_g, sequence_parallel=sp,
                             experts=ExpertParallel(ep_g, expert_tp))
    load_weights(model, path)
    b = ids.shape[0] // ep
    ids, tgt = ids[j * b:(j + 1) * b], tgt[j * b:(j + 1) * b]
    with comm.Ledger() as fwd:
        local = model(ids)
    head = model.lm_head
    ce = vocab_parallel_cross_entropy(local, tgt, group=tp_g, vocab_start=head.start,
                                      vocab_size=head.num_embeddings)
    share, aux = load_balancing_loss(model, group=ep_g)
    loss = ce * tgt.numel() + coef * share
    with comm.Ledger() as bwd:
        loss.backward()
    finalize_grads(model, tp_g)
    experts = {n for n, _ in model.named_parameters() if ".experts." in n}
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if n not in experts and ep_g is not None:
            dist.all_reduce(g, group=ep_g)
        grads[n] = (g, getattr(p, "pieces", None))
    return {"logits": gather_logits(local.detach(), head), "rows": (j * b, (j + 1) * b),
            "aux": aux, "grads": grads, "fwd": fwd.counts(), "bwd": bwd.counts()}
