"""Serving a mixture of experts: the engine's steps over tp x ep ranks give each sequence
transformers' own greedy tokens, and an expert-parallel step's all-to-alls are in the ledger.

Each case runs the engine's own pieces (``Runner``, ``Groups``, ``run_step``, the plan broadcast
and ``_follow``, the plan on the wire) on the pool's ranks: seven prompts of different lengths, late arrivals, chunked
prefill and preemption (too few KV blocks for every sequence at once), the sequences spread over
the ep TP groups by rank 0. Every step, on every rank, runs 3 all-to-alls per MoE layer (counts,
dispatch, combine: forward only), including the steps where rank 0's group has no sequence.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

VOCAB, BLOCKS, BS = 97, 12, 8


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    """A small Qwen3-MoE (a dense layer between MoE ones, 6 experts, top-2) with random weights,
    saved once; with transformers' greedy tokens for every prompt."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, head_dim=8, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=40, moe_intermediate_size=12, num_experts=6,
        num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=3, mlp_only_layers=[1],
        max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=None)
    cfg._experts_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # larger weights than the init: varied, non-repeating greedy outputs
        for p in hf.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("qwen3_moe")
    hf.save_pretrained(path)
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(3, 30))] for _ in range(7)]
    lengths = [rng.randint(4, 16) for _ in prompts]
    expect = []
    with torch.no_grad():
        for p, n in zip(prompts, lengths):
            ids = torch.tensor([p])
            for _ in range(n):
                ids = torch.cat([ids, hf(ids).logits[:, -1:].argmax(-1)], dim=1)
            expect.append(ids[0, len(p):].tolist())
    return str(path), prompts, lengths, expect


def serve_case(path: str, tp: int, ep: int, expert_tp: int | None, prompts, lengths):
    """Worker: the engine over tp x ep ranks of the pool (rank 0 leads). Returns, on rank 0,
    every sequence's tokens, the all-to-alls of each step, the groups used and the preemptions."""
    from moe_checks import groups
    from shardwise.checkpoint.source import build_model, resolve
    from shardwise.ledger import Ledger
    from shardwise.mesh import subgroup
    from shardwise.models.moe import ExpertParallel
    from shardwise.serve import wire
    from shardwise.serve.engine import Groups, Runner, _follow, run_step
    from shardwise.serve.kv import PagedKVCache
    from shardwise.serve.scheduler import SamplerSpec, Scheduler, Sequence, StepPlan
    member, tp_g, ep_g, j, t = groups(tp, ep)
    everyone = subgroup(list(range(tp * ep)))
    if not member:
        return None
    with torch.inference_mode():
        model = build_model(resolve(path), group=tp_g,
                            experts=ExpertParallel(ep_g, expert_tp)).eval()
        runner = Runner(model, tp_g, PagedKVCache(model, BLOCKS, BS), ep=ep, ep_rank=j,
                        ep_group=ep_g, tp_rank=t)
        if dist.get_rank() != 0:
            _follow(runner, everyone)
            return None
        sched = Scheduler(BLOCKS, BS, max_seqs=4, max_batched_tokens=16, prefix_caching=False)
        assign = Groups(ep) if ep > 1 else None
        seqs = [Sequence(i, p, SamplerSpec(), n) for i, (p, n) in enumerate(zip(prompts, lengths))]
        for s in seqs[:4]:
            sched.add(s)
        steps, a2a, used, idle = 0, [], set(), 0
        while sched.has_work() and steps < 300:
            if steps == 3:  # late arrivals join the running batch
                for s in seqs[4:]:
                    sched.add(s)
            plan = sched.schedule()
            if assign is not None:
                assign.assign(plan)
            used.update(c.group for c in plan.chunks)
            idle += all(c.group != 0 for c in plan.chunks)  # rank 0's group runs no tokens
            with Ledger() as ledger:
                wire.broadcast(plan, everyone, torch.device("cpu"))
                run_step(runner, sched, plan)
            a2a.append(ledger.counts().get("all_to_all", 0))
            steps += 1
        wire.broadcast(StepPlan(stop=True), everyone, torch.device("cpu"))
    return {"out": [s.output for s in seqs], "a2a": a2a, "used": used, "idle": idle,
            "preemptions": sched.preemptions, "free": sched.alloc.num_free}


# (tp, ep, expert_tp): whole experts within TP (no EP), EP beside TP, tp x ep
LAYOUTS = [(2, 1, 1), (1, 2, None), (2, 2, None)]


@pytest.mark.parametrize("tp,ep,expert_tp", LAYOUTS)
def test_engine_serves_moe_at_tp_ep(pool, moe_model, tp, ep, expert_tp):
    path, prompts, lengths, expect = moe_model
    res = pool.run(serve_case, path, tp, ep, expert_tp, prompts, lengths)[0]
    assert res["preemptions"] > 0 and res["free"] == BLOCKS
    for i, (got, want) in enumerate(zip(res["out"], expect)):
        assert got == want, (tp, ep, i)
    moe_layers = 2  # layer 1 of 3 is dense
    assert res["a2a"] == [3 * moe_layers if ep > 1 else 0] * len(res["a2a"])
    assert res["used"] == set(range(ep))
    assert (res["idle"] > 0) == (ep > 1)  # the a2a counts above include such steps
