"""The device follows the mesh; the step plan on the wire; the static input buffers of CUDA graphs
(their layout checked on the CPU, where nothing is captured)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardwise.cli import main
from shardwise.mesh import launch_env, pick_device, pick_dtype
from shardwise.serve import wire
from shardwise.serve.graphs import CudaGraphs, StaticInputs
from shardwise.serve.kv import Chunk, PagedKVCache
from shardwise.serve.scheduler import SamplerSpec, StepPlan
from shardwise.serve.step import StaticStep, StepOptions

NO_CUDA = not torch.cuda.is_available()


# ------------------------------------------------------------------ device and dtype
def test_pick_device(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device 'tpu': use one of auto, cpu, cuda"):
        pick_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto", 1) == torch.device("cuda", 1)   # one rank per GPU
    assert pick_device("cuda", 3) == torch.device("cuda", 1)   # more ranks than GPUs: shared
    assert pick_device("cpu", 1) == torch.device("cpu")        # --device cpu overrides
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", 1) == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda but CUDA is not available"):
        pick_device("cuda")


def test_pick_dtype():
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert pick_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="--dtype 'int8'"):
        pick_dtype("int8", torch.device("cpu"))


def test_launch_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert launch_env() == launch_env().__class__()  # a world of one, not launched
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    env = launch_env()
    assert (env.rank, env.world, env.local_rank, env.local_world, env.launched) == (5, 8, 1, 4,
                                                                                     True)


@pytest.mark.skipif(not NO_CUDA, reason="checks the error where CUDA is absent")
@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["serve"]])
def test_cli_device_cuda_without_cuda(command, capsys):
    code = main([*command, "--model", "debug", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "--device cuda but CUDA is not available" in err, err


def test_cli_torchrun_world_must_match_tp(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    code = main(["generate", "--model", "debug", "--prompt", "hi", "--tp", "2",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "under torchrun: tp=2" in err and "has 4 processes" in err, err


# ------------------------------------------------------------------ the plan on the wire
ints = st.integers(0, 2**40)
chunks = st.builds(Chunk, ints, st.lists(ints, max_size=5), ints, st.lists(ints, max_size=4),
                   sample=st.booleans(), long_rope=st.booleans(),
                   forks=st.lists(ints, max_size=3), targets=st.none() | st.lists(ints, max_size=4),
                   group=st.integers(0, 7))
specs = st.builds(SamplerSpec, st.floats(0, 5), st.integers(0, 1000), st.floats(0, 1),
                  st.integers(-2**63, 2**64 - 1), st.none() | st.integers(0, 20),
                  st.none() | st.integers(0, 20))
masks = st.binary(min_size=4, max_size=40).map(lambda b: b[: len(b) // 4 * 4])
plans = st.builds(StepPlan, st.lists(chunks, max_size=4), st.dictionaries(ints, specs, max_size=3),
                  st.lists(ints, max_size=3), st.dictionaries(ints, masks, max_size=3),
                  st.lists(st.tuples(ints, ints), max_size=3), st.booleans())


@settings(max_examples=150, deadline=None)
@given(plans)
def test_plan_wire_round_trip(plan):
    buf = wire.encode(plan)
    assert buf.dtype == torch.int64 and buf.dim() == 1
    assert wire.decode(buf) == plan


# ------------------------------------------------------------------ static buffers
@pytest.fixture(scope="module")
def step():
    from shardwise.models.config import preset
    from shardwise.models.llama import LlamaForCausalLM
    from shardwise.shards import init_weights
    model = LlamaForCausalLM(preset("tiny")).eval()
    init_weights(model, seed=4)
    return StaticStep(model, PagedKVCache(model, 32, 16), StepOptions(compile=False, max_seqs=8))


def _chunks(n: int, ctx: int) -> list[Chunk]:
    per = -(-(ctx + 1) // 16)
    return [Chunk(i, [7 + i], ctx - i, list(range(i * per, (i + 1) * per)), True)
            for i in range(n)]


@torch.inference_mode()
def test_static_inputs_views_and_replay_equivalence(step):
    """Each bucket's five inputs are views of one buffer that keeps its address from step to step
    (what a captured graph reads), equal to the step's own inputs; the decode function over the
    views equals the decode over fresh tensors."""
    assert step.cuda is None and step.graph_count == 0  # the CPU: no graphs, eager
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        CudaGraphs(step._decode, torch.device("cpu"))
    for n, ctx in ((1, 3), (3, 40), (5, 70)):
        host = step.host_inputs(_chunks(n, ctx))
        B, L = host[3].shape
        static = StaticInputs(B, L, torch.device("cpu"))
        ptrs = [t.data_ptr() for t in static.args]
        static.fill(*host)
        for got, want in zip(static.args, host):
            assert torch.equal(got, want)
        assert [t.data_ptr() for t in static.args] == ptrs
        assert all(t.untyped_storage().data_ptr() == static.flat.data_ptr() for t in static.args)
        want = step._decode(*host)
        got = step._decode(*static.args)  # rewrites the same keys and values in the same slots
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        other = step.host_inputs(_chunks(n, ctx - 1))
        static.fill(*other)
        assert torch.equal(static.table, other[3]) and not torch.equal(other[3], host[3])
    with pytest.raises(ValueError, match=r"in the \(1, 64\) bucket"):
        StaticInputs(1, 64, torch.device("cpu")).fill(*step.host_inputs(_chunks(2, 3)))
