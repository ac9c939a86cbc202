"""Partitions, head layouts, the mesh, the ledger, the RNG tracker, errors that name the numbers."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardwise import HeadLayout, Mesh, Partition, split_sizes, vocab_partition
from shardwise.mesh import grid, validate


@given(total=st.integers(1, 5000), parts=st.integers(1, 64))
@settings(max_examples=300, deadline=None)
def test_split_is_contiguous_and_balanced(total, parts):
    if total < parts:
        with pytest.raises(ValueError, match=f"tp={parts} but there are only {total}"):
            split_sizes(total, parts)
        return
    p = Partition(total, parts)
    assert sum(p.sizes) == total and max(p.sizes) - min(p.sizes) <= 1
    stops = [p.range(r)[1] for r in range(parts)]
    starts = [p.range(r)[0] for r in range(parts)]
    assert starts[0] == 0 and stops[-1] == total and starts[1:] == stops[:-1]


@given(vocab=st.integers(1, 200_000), tp=st.integers(1, 16), multiple=st.sampled_from([1, 64, 128]))
@settings(max_examples=200, deadline=None)
def test_vocab_padding(vocab, tp, multiple):
    p = vocab_partition(vocab, tp, multiple=multiple)
    assert p.padded % (tp * multiple) == 0 and 0 <= p.pad < tp * multiple
    assert p.even and p.padded >= vocab
    real = sum(b - a for a, b in (p.real_range(r) for r in range(tp)))
    assert real == vocab


def test_known_splits():
    assert split_sizes(9, 2) == [5, 4]
    assert split_sizes(9, 4) == [3, 2, 2, 2]
    assert vocab_partition(50257, 4).padded == 50260
    assert vocab_partition(49152, 3).pad == 0


def test_head_layout_sharded_and_replicated():
    sharded = HeadLayout(12, 4, 4)
    assert [sharded.kv_range(r) for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert not sharded.replicated
    vllm_like = HeadLayout(8, 2, 4)  # tp a multiple of kv heads: vLLM's replication
    assert [vllm_like.kv_range(r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert vllm_like.shared_kv_heads() == [0, 1]
    uneven = HeadLayout(9, 3, 2)  # SmolLM2 at tp=2: 5 + 4 query heads
    assert uneven.q_range(0) == (0, 5) and uneven.q_range(1) == (5, 9)
    assert uneven.kv_range(0) == (0, 2) and uneven.kv_range(1) == (1, 3)
    assert uneven.holders(1) == [0, 1] and uneven.kv_index(0) == [0, 0, 0, 1, 1]


def test_bad_configurations_name_the_numbers():
    with pytest.raises(ValueError, match=r"tp=12 but the model has 9 query heads.*use tp in \{1, 2"):
        HeadLayout(9, 3, 12)
    with pytest.raises(ValueError, match=r"tp=2 x pp=2 x dp=1 = 4 but the world has 3 processes"):
        validate(2, 2, 1, 3)
    with pytest.raises(ValueError, match="tp=0"):
        validate(0, 1, 1, 0)
    from shardwise.comm import split_dim
    with pytest.raises(ValueError, match=r"size 10 over tp=3.*pad the sequence to 12"):
        split_dim(torch.zeros(1, 10, 4), _FakeGroup(3), dim=1)


class _FakeGroup:
    """Stands in for a 3-rank group in a shape check that fails before any collective."""

    def __init__(self, n):
        self.n = n


@pytest.fixture(autouse=True)
def _fake_sizes(monkeypatch):
    import shardwise.comm as comm
    real = comm.group_size
    monkeypatch.setattr(comm, "group_size", lambda g: g.n if isinstance(g, _FakeGroup) else real(g))


def test_grid_tp_innermost():
    g = grid(tp=2, pp=2, dp=2)
    assert g[0, 0].tolist() == [0, 1] and g[0, 1].tolist() == [2, 3] and g[1, 0].tolist() == [4, 5]
    mesh = Mesh(tp=2, pp=2, dp=2, rank=5)
    assert mesh.coords == (1, 0, 1)
    assert mesh.ranks("tp") == [4, 5] and mesh.ranks("dp") == [5, 7] and mesh.ranks("pp") == [1, 5]


def _mesh_worker():
    from shardwise import Mesh
    from shardwise.comm import Ledger
    mesh = Mesh.init(tp=2, pp=1, dp=2)
    t = torch.ones(3) * mesh.rank
    with Ledger() as ledger:
        torch.distributed.all_reduce(t, group=mesh.tp_group)  # a raw call is counted too
        torch.distributed.all_reduce(t, group=mesh.dp_group)
    return mesh.coords, mesh.ranks("tp"), mesh.ranks("dp"), t.tolist(), ledger.summary()


def _rng_worker():
    from shardwise import Mesh
    from shardwise.random import dropout_like_unsharded, seed_everything
    mesh = Mesh.init(tp=2)
    tracker = seed_everything(mesh, 1234)
    same = torch.rand(4)
    with tracker.fork():
        diff = torch.rand(4)
    after = torch.rand(4)
    g = torch.Generator().manual_seed(5)
    x = torch.ones(2, 4)
    piece = dropout_like_unsharded(x, 0.5, full_size=8, start=4 * mesh.tp_rank, generator=g)
    return same, diff, after, piece


def test_mesh_groups_ledger_and_rng():
    from shardwise.launch import spawn
    res = spawn(_mesh_worker, 4)
    assert [r[0] for r in res] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert res[3][1] == [2, 3] and res[3][2] == [1, 3]
    assert all(r[3] == [6.0] * 3 for r in res)  # tp sums (0+1, 2+3), then dp sum 1 + 5
    for r in res:
        assert r[4]["all_reduce"]["calls"] == 2 and r[4]["all_reduce"]["bytes"] == 24
    rng = spawn(_rng_worker, 2)
    assert torch.equal(rng[0][0], rng[1][0]) and torch.equal(rng[0][2], rng[1][2])
    assert not torch.equal(rng[0][1], rng[1][1])
    full = torch.cat([rng[0][3], rng[1][3]], dim=-1)  # the two halves of one unsharded mask
    g = torch.Generator().manual_seed(5)
    from shardwise.random import dropout_like_unsharded
    ref = dropout_like_unsharded(torch.ones(2, 8), 0.5, full_size=8, start=0, generator=g)
    assert torch.equal(full, ref)


def test_demo_command():
    out = subprocess.run([sys.executable, "-m", "shardwise.cli", "demo", "--tp", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout and "forward {'all_reduce': 2}" in out.stdout


def test_torchrun_two_nodes(tmp_path):
    """Two 'nodes' of one process each, rendezvous on 127.0.0.1, vs the single-process result."""
    from shardwise.launch import free_port
    port = free_port()
    script = os.path.join(os.path.dirname(__file__), "torchrun_worker.py")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
         script, str(tmp_path / f"out{node}.pt")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    sys.path.insert(0, os.path.dirname(__file__))
    from torchrun_worker import compute
    ref = compute(None)
    for node in (0, 1):
        got = torch.load(tmp_path / f"out{node}.pt")
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    from shardwise.models.config import preset
    from shardwise.models.llama import LlamaForCausalLM
    from shardwise.shards import init_weights
    m = LlamaForCausalLM(preset("tiny"))
    init_weights(m, seed=3)
    ids = torch.randint(0, 256, (2, 16))
    ref = m(ids)
    got = m.cuda()(ids.cuda()).cpu()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generation_matches_cpu():
    """The inference path (KV cache, vocab-parallel sampling, Gumbel noise) on a CUDA device."""
    from shardwise.generate import GenerateJob, run_generation
    from shardwise.sampling import SamplingParams
    from shardwise.checkpoint.source import build_model, resolve
    job = GenerateJob("tiny", 1, [1, 5, 9, 3], SamplingParams(max_tokens=8), stream=None)
    cuda = run_generation(job)["token_ids"]  # Mesh.init picks the GPU
    model, ids = build_model(resolve("tiny")), [1, 5, 9, 3]  # the same seed-0 weights, on CPU
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert cuda[:4] == ids[4:8]  # fp32 on both: a later flip would need a near-tie
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=3)
    sampled = run_generation(GenerateJob("tiny", 1, [1, 5, 9, 3], params, stream=None))
    again = run_generation(GenerateJob("tiny", 1, [1, 5, 9, 3], params, stream=None))
    assert sampled["token_ids"] == again["token_ids"] and len(sampled["token_ids"]) == 8
    assert sampled["token_ids"] != cuda  # temperature 0.8 on near-uniform logits: not greedy
