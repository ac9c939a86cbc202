"""generate and serve under torchrun (one node, two processes, gloo on the CPU): the torchrun
processes are the ranks (their parent is torchrun's agent: nothing spawned), and the answers
equal the same job on ranks spawned by shardwise itself.

Sampled at temperature 1 with a seed, so that the tokens are not a degenerate greedy loop of a
random model: equal answers need the same logits and the same noise on every path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from shardwise.launch import free_port
from test_serve_util import ROOT, Server, proc_stat

MODEL, PROMPT, SEED, NEW = "debug", "Tell me about rivers", 3, 6
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1"]


@pytest.fixture(scope="module")
def spawned():
    """The reference: tp=2 on two processes that shardwise spawns."""
    from shardwise.checkpoint.source import load_tokenizer, resolve
    from shardwise.generate import GenerateJob, encode_prompt, generate
    from shardwise.sampling import SamplingParams
    source = resolve(MODEL)
    ids = encode_prompt(load_tokenizer(source), PROMPT, chat=True)
    job = GenerateJob(MODEL, 2, ids, SamplingParams(temperature=1.0, seed=SEED, max_tokens=NEW),
                      stream=None, eos_ids=source.config.eos_ids, compile=False, device="cpu")
    out = generate(job)
    return {"ids": ids, "token_ids": out[0]["token_ids"], "text": out[0]["text"],
            "ppids": [r["signals"]["ppid"] for r in out]}


def test_generate_under_torchrun_uses_its_ranks(spawned):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(
        [*TORCHRUN, "--master-port", str(free_port()), "-m", "shardwise", "generate",
         "--model", MODEL, "--tp", "2", "--prompt", PROMPT, "--max-new-tokens", str(NEW),
         "--temperature", "1", "--seed", str(SEED), "--no-compile", "--json"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, out  # rank 0 alone speaks
    got = json.loads(lines[0])
    assert len(spawned["token_ids"]) == NEW and len(set(spawned["token_ids"])) > 1
    assert got["token_ids"] == spawned["token_ids"] and got["text"] == spawned["text"]
    ranks = got["signals"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["ppid"] for r in ranks] == [proc.pid, proc.pid]  # torchrun's own processes
    assert {r["device"] for r in ranks} == {"cpu"} and {r["dtype"] for r in ranks} == {"float32"}
    assert spawned["ppids"][0] != proc.pid


def test_serve_under_torchrun_rank0_hosts_http(spawned):
    s = Server("--model", MODEL, "--tp", "2", "--no-compile", "--max-seqs", "4", torchrun=2)
    try:
        health = httpx.get(s.url + "/health", timeout=10).json()
        assert health["status"] == "ok" and health["tp"] == 2
        assert len(set(health["workers"])) == 2
        assert [int(proc_stat(p)[1]) for p in health["workers"]] == [s.proc.pid] * 2
        r = httpx.post(s.url + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": spawned["ids"], "max_tokens": NEW, "temperature": 1.0,
            "seed": SEED})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == spawned["text"]
        assert r.json()["usage"]["completion_tokens"] == len(spawned["token_ids"])
    finally:
        log = s.output()
        s.close()
    assert s.proc.returncode is not None, log
    assert "Traceback" not in log, log[-3000:]
    assert "(cpu, float32, torchrun)" in log, log[-3000:]
