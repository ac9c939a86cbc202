"""On CUDA (skipped without it): the graphed decode step equals the eager one, generate on the GPU
equals the CPU, the engine runs there; with two GPUs, generate at tp=2 over NCCL under torchrun.

Tolerances: fp32 on the GPU against fp32 on the CPU agrees to ~1e-5 per layer (other kernels,
other summation orders; TF32 stays off); a replayed graph runs the kernels it captured, so
graphed and eager agree to rounding (1e-5 on logits of size ~1-10; compiled: 1e-4).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(device, dtype=torch.float32):
    from shardwise.checkpoint.source import build_model, resolve
    m = build_model(resolve("tiny"), dtype=dtype, device=device).eval()
    with torch.no_grad():  # larger weights than the init: varied greedy tokens
        g = torch.Generator().manual_seed(0)
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _decode(step, prompts, steps):
    """Prefill ``prompts`` (one mixed step), then ``steps`` greedy decode steps: logits, tokens."""
    from shardwise.serve.kv import Chunk
    per = -(-(max(len(p) for p in prompts) + steps + 1) // 16)
    blocks = [list(range(i * per, (i + 1) * per)) for i in range(len(prompts))]
    toks = step([Chunk(i, p, 0, blocks[i], True) for i, p in enumerate(prompts)]).argmax(-1)
    lens, out = [len(p) for p in prompts], []
    for _ in range(steps):
        lg = step([Chunk(i, [int(toks[i])], lens[i], blocks[i], True)
                   for i in range(len(prompts))])
        out.append(lg.float().cpu().clone())
        toks = lg.argmax(-1)
        lens = [n + 1 for n in lens]
    return out


@torch.inference_mode()
@pytest.mark.parametrize("compiled", [False, True])
def test_graphed_step_equals_eager(compiled):
    """Buckets B=4 (3 sequences + a padding row) across the 64 -> 128 key-width boundary."""
    from shardwise.serve.kv import PagedKVCache
    from shardwise.serve.step import StaticStep, StepOptions
    m = _model("cuda")
    prompts = [list(range(5, 60)), list(range(3, 20)), list(range(7, 50))]
    sides = {}
    for graphs in (False, True):
        step = StaticStep(m, PagedKVCache(m, 32, 16),
                          StepOptions(compile=compiled and graphs, cuda_graphs=graphs,
                                      max_seqs=4))
        sides[graphs] = (_decode(step, prompts, 20), step)
    (eager, _), (graphed, step) = sides[False], sides[True]
    assert step.cuda is not None and sorted(step.cuda.graphs) == [(4, 64), (4, 128)]
    atol = 1e-4 if compiled else 1e-5
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(b, a, atol=atol, rtol=0)


def test_generate_cuda_equals_cpu():
    from shardwise.generate import GenerateJob, generate
    from shardwise.sampling import SamplingParams
    runs = {}
    for device in ("cpu", "cuda"):
        job = GenerateJob("tiny", 1, list(range(3, 30)), SamplingParams(max_tokens=16),
                          stream=None, dtype="float32", device=device)
        runs[device] = generate(job)[0]
    assert runs["cuda"]["signals"]["device"] == "cuda:0"
    assert runs["cuda"]["signals"]["graphs"] >= 1
    assert runs["cuda"]["token_ids"] == runs["cpu"]["token_ids"]
    bf16 = generate(GenerateJob("tiny", 1, [1, 2, 3], SamplingParams(max_tokens=4), stream=None,
                                compile=False))[0]["signals"]
    assert bf16["device"] == "cuda:0" and bf16["dtype"] == "bfloat16"  # the GPU's default


@torch.inference_mode()
def test_engine_on_cuda_matches_cpu():
    """Continuous batching on the GPU gives each sequence the CPU engine's greedy tokens."""
    from shardwise.serve.engine import Runner
    from shardwise.serve.kv import PagedKVCache
    from shardwise.serve.scheduler import SamplerSpec, Scheduler, Sequence
    from shardwise.serve.step import StepOptions
    prompts = [list(range(3, 3 + n)) for n in (5, 33, 17, 60)]
    out = {}
    for device in ("cpu", "cuda"):
        m = _model(device)
        runner = Runner(m, None, PagedKVCache(m, 24, 16),
                        options=StepOptions(compile=False, max_seqs=4))  # CUDA: graphed
        sched = Scheduler(24, 16, max_seqs=4, max_batched_tokens=32)
        seqs = [Sequence(i, p, SamplerSpec(), 12) for i, p in enumerate(prompts)]
        for s in seqs:
            sched.add(s)
        while sched.has_work():
            plan = sched.schedule()
            sched.update(plan, runner.execute(plan).sampled)
        out[device] = [s.output for s in seqs]
        assert runner.cache.device.type == device
    assert out["cuda"] == out["cpu"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_generate_tp2_nccl_under_torchrun():
    from shardwise.launch import free_port
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "shardwise", "generate", "--model", "debug",
           "--tp", "2", "--prompt", "hello", "--max-new-tokens", "8", "--dtype", "float32",
           "--json"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][0])
    assert [r["device"] for r in got["signals"]["ranks"]] == ["cuda:0", "cuda:1"]
