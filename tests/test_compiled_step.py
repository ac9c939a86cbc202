"""The static decode step compiled against the same step eager, at tp 1-3 on random GQA models
(SmolLM2's uneven head split at tp=2): logits within 1e-4 (fp32), greedy tokens and per-step
collectives identical, no graph breaks, one graph for a batch of one and one for every larger
bucket, no recompiles as widths grow; bucket selection between buckets; ``--no-compile``; rank
placement on a fake NUMA topology.
"""
from __future__ import annotations

import argparse
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardwise.affinity import parse_cpulist, plan, read_nodes
from shardwise.models.config import LlamaConfig
from shardwise.serve.kv import Chunk
from shardwise.serve.step import batch_buckets, width_bucket

# 6 query heads over 2 KV heads: regular GQA at tp 1-2, KV heads replicated at tp 3
GQA = LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256)
# SmolLM2's 9 query heads over 3 KV heads, with heads of 8: split 5 + 4 and 2 + 1 at tp=2
UNEVEN = LlamaConfig(vocab_size=256, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256)
PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46], [26, 43, 38], list(range(40, 100))]


def _model(cfg, group):
    from shardwise.models.llama import LlamaForCausalLM
    from shardwise.shards import init_weights
    model = LlamaForCausalLM(cfg, group=group).eval()
    init_weights(model, seed=0, std=0.3)  # large weights: varied greedy tokens, no near-ties
    return model


def compare_worker(tp: int):
    import torch.distributed as dist
    from shardwise.mesh import subgroup
    from shardwise.serve.compare import compare_compiled
    group = subgroup(list(range(tp)))
    if dist.get_rank() >= tp:
        return None
    import torch._inductor.config
    torch._inductor.config.compile_threads = 1  # 4 workers on 2 cores: no compile subprocesses
    model = _model(UNEVEN if tp == 2 else GQA, group)
    # three sequences (bucket 4, one padding row; the 60-token one crosses the width 64), one
    # compile each tp (seconds to minutes cold). tp=1 runs inductor's C++ wrapper (off in the
    # test suite: conftest), the CPU default; bucket 1 compiled is test_real_model's (SmolLM2)
    os.environ["SHARDWISE_CPP_WRAPPER"] = "1" if tp == 1 else "0"
    try:
        return vars(compare_compiled(model, group, PROMPTS, steps=8))
    finally:
        os.environ["SHARDWISE_CPP_WRAPPER"] = "0"


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_compiled_equals_eager(pool, tp):
    results = [r for r in pool.run(compare_worker, tp) if r]
    assert len(results) == tp
    for c in results:
        label = f"tp={tp}"
        assert c["max_abs_diff"] <= 1e-4, label
        assert c["tokens_equal"], (label, c["eager_tokens"], c["compiled_tokens"])
        assert c["eager_collectives"] == c["compiled_collectives"], label
        # per decode step: the embedding + 2 per layer, and the sampling's all-gather
        want = {"all_reduce": 1 + 2 * GQA.num_hidden_layers, "all_gather": 1} if tp > 1 else {}
        assert c["compiled_collectives"] == want, label
        assert c["graph_breaks"] == 0 and c["graphs"] == 1, label  # no recompile as L grows
        assert c["buckets"] == [4], label
        assert c["cpp_wrapper"] == (tp == 1), label
        assert c["native_all_reduce"] == (tp > 1), label  # shared memory, from C++
    tokens = [r["compiled_tokens"] for r in results]
    assert all(t == tokens[0] for t in tokens)  # every rank sampled the same tokens


@torch.inference_mode()
def test_graph_budget_and_buckets(monkeypatch):
    """One step, batches 1..6 and widths 64 and 128: buckets 1, 4 and 6 in two graphs (batch 1,
    and batch symbolic above it), no recompile across buckets or widths.

    Dynamo decides the graphs and the breaks whatever compiles them; the ``eager`` backend
    skips inductor's code generation (compiled == eager above runs inductor)."""
    import functools
    from torch._dynamo.utils import counters
    from shardwise.serve import step as step_module
    from shardwise.serve.kv import PagedKVCache
    from shardwise.serve.step import StaticStep, StepOptions
    monkeypatch.setattr(step_module.torch, "compile",
                        functools.partial(torch.compile, backend="eager"))
    model = _model(GQA, None)
    step = StaticStep(model, PagedKVCache(model, 64, 16), StepOptions(max_seqs=6, max_graphs=3))
    assert step.buckets == [1, 4, 6]  # ratio 2 would give 1, 2, 4, 6: over a budget of 3
    graphs0, breaks0 = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    for n, ctx in ((1, 10), (2, 70), (3, 20), (4, 100), (5, 30), (6, 120), (1, 90)):
        chunks = [Chunk(i, [7], ctx, list(range(i * 10, i * 10 + 10)), True) for i in range(n)]
        assert step(chunks).shape == (n, GQA.vocab_size)
    assert len(step.graphs) == 3  # buckets 1, 4 and 6 ran
    assert counters["stats"]["unique_graphs"] - graphs0 == 2 == step.graph_count  # 1, and B > 1
    assert sum(counters["graph_break"].values()) == breaks0


def test_bucket_selection_between_buckets():
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(256) == [1, 4, 16, 64, 256]  # ratio 4 keeps 5 graphs within 8
    assert len(batch_buckets(10_000)) <= 8
    assert [width_bucket(n, 8192) for n in (1, 64, 65, 128, 129, 5000)] == \
        [64, 64, 128, 128, 256, 8192]
    assert width_bucket(100, 100) == 100
    with pytest.raises(ValueError, match="exceeds the limit"):
        width_bucket(300, 256)
    from shardwise.serve.kv import PagedKVCache
    from shardwise.serve.step import StaticStep, StepOptions
    model = _model(GQA, None)
    cache = PagedKVCache(model, 16, 16)
    step = StaticStep(model, cache, StepOptions(compile=False, max_seqs=8))
    chunks = [Chunk(0, [5], 69, [3, 1, 4, 9, 2], True), Chunk(1, [6], 2, [7], True),
              Chunk(2, [8], 20, [0, 5], True)]
    ids, pos, slots, table, lens = step.decode_inputs(chunks)
    assert ids.tolist() == [5, 6, 8, 0] and pos.tolist() == [69, 2, 20, 0]  # 3 rows -> bucket 4
    assert table.shape == (4, 128) and lens.tolist() == [70, 3, 21, 1]      # 70 keys -> 128
    null = cache.null_slot
    assert slots.tolist() == [2 * 16 + 5, 7 * 16 + 2, 5 * 16 + 4, null]
    assert table[0, :70].tolist() == [b * 16 + o for b in (3, 1, 4, 9, 2) for o in range(16)][:70]
    assert (table[0, 70:] == null).all() and (table[1, 3:] == null).all() and (table[3] == null).all()
    with pytest.raises(ValueError, match="exceed max_seqs=8"):
        step.decode_inputs([chunks[0]] * 9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.lists(st.integers(-1, 30), max_size=16),
                          st.integers(0, 255)), min_size=1, max_size=8))
def test_decode_inputs_match_their_definition(rows):
    """The decode inputs (built in numpy), position by position: row i's key p reads slot
    ``blocks[p // bs] * bs + p % bs`` when p is within its context and a block (not -1) holds it,
    else the null slot; rows past the chunks (the bucket's padding) read only the null slot."""
    from shardwise.serve.kv import PagedKVCache
    from shardwise.serve.step import StaticStep, StepOptions
    model = _STEP_MODEL.setdefault("m", _model(GQA, None))
    cache = PagedKVCache(model, 32, 16)
    step = StaticStep(model, cache, StepOptions(compile=False, max_seqs=8))
    chunks = [Chunk(i, [tok], start, blocks, True) for i, (start, blocks, tok) in enumerate(rows)]
    ids, pos, slots, table, lens = step.host_inputs(chunks)
    B, L = table.shape
    bs, null = cache.block_size, cache.null_slot
    assert B == min(b for b in batch_buckets(8) if b >= len(rows))
    assert L == width_bucket(max(c.start + 1 for c in chunks), step.limit)
    for i in range(B):
        c = chunks[i] if i < len(chunks) else None
        want = []
        for p in range(L):
            blk = c.blocks[p // bs] if c is not None and p // bs < len(c.blocks) else -1
            want.append(blk * bs + p % bs if c is not None and p <= c.start and blk >= 0
                        else null)
        assert table[i].tolist() == want
        assert ids[i] == (c.tokens[0] if c else 0) and pos[i] == (c.start if c else 0)
        assert lens[i] == (c.start + 1 if c else 1)
        assert slots[i] == (want[min(c.start, L - 1)] if c else null)


_STEP_MODEL: dict = {}


def test_no_compile_flag_everywhere():
    from shardwise.cli import build_parser
    from shardwise.generate import GenerateJob
    for argv in (["generate", "--model", "tiny", "--prompt", "x", "--no-compile"],
                 ["serve", "--model", "tiny", "--no-compile"],
                 ["verify", "--model", "tiny", "--tp", "2", "--no-compile"],
                 ["bench", "decode", "--no-compile"], ["bench", "serve", "--no-compile"]):
        args = build_parser(argv[0]).parse_args(argv)
        assert args.no_compile is True, argv
        assert build_parser(argv[0]).parse_args(argv[:-1]).no_compile is False, argv
    from shardwise.serve.cli import engine_config
    args = build_parser("serve").parse_args(["serve", "--model", "tiny", "--no-compile"])
    assert engine_config(args).compile is False
    assert GenerateJob("tiny", 1, [1], None).compile is True


def test_pinning_on_a_fake_numa_topology(tmp_path):
    for i, cpus in enumerate(("0-3", "4-7")):
        (tmp_path / f"node{i}").mkdir()
        (tmp_path / f"node{i}" / "cpulist").write_text(cpus + "\n")
    (tmp_path / "possible").write_text("0-1\n")  # not a node directory: ignored
    assert parse_cpulist("0-2,5,7-8") == [0, 1, 2, 5, 7, 8]
    nodes = read_nodes(tmp_path, allowed=set(range(8)))
    assert nodes == [[0, 1, 2, 3], [4, 5, 6, 7]]
    two = plan(2, nodes)
    assert two.cores == [[0, 1, 2, 3], [4, 5, 6, 7]] and two.nodes == [0, 1] and two.note is None
    for n in (3, 4, 5, 8):
        p = plan(n, nodes)
        flat = [c for cores in p.cores for c in cores]
        assert len(p.cores) == n and len(flat) == len(set(flat)), (n, p.cores)  # disjoint
        for cores, node in zip(p.cores, p.nodes):
            assert set(cores) <= set(nodes[node]) and cores, (n, p.cores)   # within its node
        assert p.note is None
    assert plan(4, nodes).cores == [[0, 1], [2, 3], [4, 5], [6, 7]]
    over = plan(10, nodes)
    assert over.note and "10 ranks on 8 cores" in over.note
    assert [c for cores in over.cores for c in cores] == list(range(8)) + [0, 1]
    # a cgroup that allows only some CPUs: nodes shrink, empty ones disappear
    assert read_nodes(tmp_path, allowed={1, 2}) == [[1, 2]]
    assert plan(2, read_nodes(tmp_path, allowed={1, 2})).cores == [[1], [2]]
