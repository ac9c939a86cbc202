"""One request cannot take the engine down (in-process, tp=1, the tiny random model): rank 0's
admission check refuses what a step could not run, and a step that raises fails only the request
that caused it while the others finish with exactly their solo greedy tokens."""
from __future__ import annotations

import torch

from shardwise.serve.admit import admission_error
from shardwise.serve.engine import Runner, run_step
from shardwise.serve.kv import PagedKVCache
from shardwise.serve.scheduler import SamplerSpec, Scheduler, Sequence
from shardwise.serve.step import StepOptions
from test_serve_engine import _model, _solo

POISON = 77


class Poisoned:
    """The model, except that a step containing the token POISON raises (a stand-in for any
    per-request failure the checks before did not foresee)."""

    def __init__(self, model) -> None:
        self.inner = model

    def __getattr__(self, name):  # everything else (config, layers, lm_head) is the model's
        return getattr(self.inner, name)

    def __call__(self, ids, *args, **kw):
        if bool((ids == POISON).any()):
            raise RuntimeError("poisoned token in the batch")
        return self.inner(ids, *args, **kw)


def test_admission_refuses_what_a_step_could_not_run():
    def why(prompt=(1, 2, 3), max_tokens=4, **spec):
        return admission_error(Sequence(1, list(prompt), SamplerSpec(**spec), max_tokens),
                               vocab=256, context=64, num_blocks=4, block_size=8)
    assert why() is None
    assert why(seed=-(2**63)) is None and why(seed=2**63 - 1) is None
    assert "invalid sampling parameters" in why(seed=2**80)
    assert "outside the vocabulary [0, 256)" in why(prompt=(1, 256))
    assert "outside the vocabulary" in why(prompt=(-1,))
    assert "the prompt is empty" == why(prompt=())
    assert "max_tokens=0 must be" in why(max_tokens=0)
    assert "exceed the model's context of 64" in why(max_tokens=62)
    assert "need 5 KV blocks but the cache has 4" in why(prompt=(1,) * 30, max_tokens=10)
    assert "temperature=-1" in why(temperature=-1.0)
    assert "logprobs=300" in why(logprobs=300)


@torch.inference_mode()
def test_a_failing_step_fails_only_its_request():
    m = _model()
    prompts = [[5, 6, 7, 8], [9, POISON, 10], [11, 12], [13, 14, 15, 16, 17]]
    n_new = 6
    ref = {i: _solo(m, p, n_new) for i, p in enumerate(prompts) if POISON not in p}
    # eager: the stand-in's check of the batch is data-dependent Python that dynamo refuses
    runner = Runner(Poisoned(m), None, PagedKVCache(m, 16, 8), options=StepOptions(compile=False))
    sched = Scheduler(16, 8, max_seqs=4, max_batched_tokens=64)
    seqs = [Sequence(i, p, SamplerSpec(), n_new) for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    failed, isolated, steps = [], False, 0
    while sched.has_work() and steps < 100:
        _, _, f = run_step(runner, sched, sched.schedule())
        isolated |= bool(sched.suspects)
        failed += f
        steps += 1
    assert isolated  # the first step held all four: they were retried one by one
    assert [sid for sid, _ in failed] == [1]
    assert "poisoned token in the batch" in failed[0][1]
    assert sched.alloc.num_free == 16 and not sched.suspects
    for i, want in ref.items():
        assert seqs[i].output == want, i


def test_a_refused_request_gets_its_error_alone():
    """A ``fail`` event from rank 0 ends that request's stream with its status; others wait on."""
    import asyncio

    from shardwise.serve.client import EngineClient
    from shardwise.serve.engine import EngineConfig

    async def go():
        c = EngineClient(EngineConfig(model="tiny"))  # no worker started: events fed by hand
        [(a, qa)] = c.submit([1, 2], [SamplerSpec()], 2, [])
        [(b, qb)] = c.submit([3, 4], [SamplerSpec()], 2, [])
        c._deliver(("fail", a, 400, "prompt token id 300 is outside the vocabulary"))
        assert qa.get_nowait() == ("error", "prompt token id 300 is outside the vocabulary", 400,
                                   "invalid_value")
        assert qb.empty() and c.dead is None
        c._deliver(("step", [(b, 7, "length", None)], [], {}))
        assert qb.get_nowait()[:3] == ("token", 7, "length")
    asyncio.run(go())
