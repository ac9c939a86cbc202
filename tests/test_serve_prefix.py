"""The engine in-process (tp=1, the tiny random model): prefix caching, n samples forked from one
prefill, token masks, prompt log-probabilities. Each result is checked against the engine without
the feature (or the plain model): the same tokens, blocks all returned."""
from __future__ import annotations

import random

import pytest
import torch

from shardwise.serve.blocks import BlockPool, extend_hashes
from shardwise.serve.engine import Runner, run_step
from shardwise.serve.kv import PagedKVCache
from shardwise.serve.scheduler import SamplerSpec, Scheduler, Sequence
from test_serve_engine import _model, _solo

BS = 4


@pytest.fixture(scope="module")
def m():
    return _model()


def _run(m, seqs_by_step: dict[int, list[Sequence]], *, blocks: int = 64, caching: bool = True,
         max_seqs: int = 8, budget: int = 32) -> Scheduler:
    """Run the engine until idle; ``seqs_by_step[i]`` arrive before step i."""
    runner = Runner(m, None, PagedKVCache(m, blocks, BS))
    sched = Scheduler(blocks, BS, max_seqs=max_seqs, max_batched_tokens=budget,
                      prefix_caching=caching)
    step = 0
    while (sched.has_work() or any(k >= step for k in seqs_by_step)) and step < 2000:
        for s in seqs_by_step.get(step, []):
            sched.add(s)
        if sched.has_work():
            run_step(runner, sched, sched.schedule())
        step += 1
    assert not sched.has_work()
    assert sched.alloc.num_used == 0  # every hold released: cached blocks are free to evict
    return sched


@torch.inference_mode()
def test_prefix_cache_reuses_blocks_and_keeps_the_tokens(m):
    results = {}
    for caching in (False, True):
        rng = random.Random(1)  # the same conversations with and without the cache
        system = [rng.randrange(256) for _ in range(11)]  # shared by every prompt: 2 blocks
        runner = Runner(m, None, PagedKVCache(m, 64, BS))
        sched = Scheduler(64, BS, max_seqs=4, max_batched_tokens=24, prefix_caching=caching)
        convs = [system + [rng.randrange(256) for _ in range(3 + i)] for i in range(3)]
        outs = []
        for turn in range(3):
            seqs = [Sequence(10 * turn + i, list(p), SamplerSpec(), 5)
                    for i, p in enumerate(convs)]
            for s in seqs:
                sched.add(s)
            while sched.has_work():
                run_step(runner, sched, sched.schedule())
            outs.append([s.output for s in seqs])
            convs = [p + s.output + [7, 8, 9] for p, s in zip(convs, seqs)]
        assert sched.alloc.num_used == 0
        results[caching] = (outs, sched.hit_tokens, sched.prefill_tokens, convs)
    (off, hit_off, pre_off, convs), (on, hit_on, pre_on, _) = results[False], results[True]
    assert on == off and hit_off == 0
    # every turn after the first reuses what the previous turn computed, block-aligned
    assert hit_on > 0 and pre_on == pre_off - hit_on, (hit_on, pre_on, pre_off)
    assert hit_on >= sum(len(c) - 3 - 5 for c in convs) // 2
    ref = [_solo(m, p[:len(p) - 3 - 5], 5) for p in convs]  # the last turn, solo
    assert on[-1] == ref


@torch.inference_mode()
def test_eviction_under_pressure_keeps_the_tokens(m):
    rng = random.Random(2)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(9, 20))] for _ in range(4)]
    prompts += [p + [1, 2] for p in prompts]  # second round: the first round's prefixes again
    ref = [_solo(m, p, 5) for p in prompts]
    seqs = [Sequence(i, list(p), SamplerSpec(), 5) for i, p in enumerate(prompts)]
    sched = _run(m, {0: seqs[:4], 30: seqs[4:]}, blocks=10, max_seqs=3)
    assert sched.alloc.evictions > 0 and sched.hit_tokens > 0
    assert [s.output for s in seqs] == ref


def test_block_pool_shares_counts_and_evicts_lru():
    pool = BlockPool(4, 2)
    toks = [1, 2, 3, 4, 5]
    h: list[bytes] = []
    extend_hashes(h, toks, 5, 2)
    assert len(h) == 2
    a = pool.allocate(3)
    pool.register(a, h, toks)
    b = pool.lookup(h, toks, limit=4)
    assert b == a[:2] and pool.num_used == 3
    assert pool.lookup(h, [1, 2, 9, 9, 5], limit=4) == a[:1]  # a different second block
    pool.free(a[:1])
    pool.free(a)
    pool.free(b)
    assert pool.num_used == 0 and pool.num_cached == 2
    other: list[bytes] = []
    extend_hashes(other, [7, 7, 7, 7], 4, 2)
    assert pool.lookup(other, [7, 7, 7, 7], limit=3) == []
    got = pool.allocate(3)  # 2 free blocks, then the least recently released cached one
    assert pool.evictions == 1 and pool.num_cached == 1 and len(set(got)) == 3
    assert pool.lookup(h, toks, limit=4) == [a[0]]  # the head survived, the tail went first


@torch.inference_mode()
def test_n_samples_fork_from_one_prefill(m):
    prompt = list(range(30, 43))  # 13 tokens: 3 full blocks and a partial one to copy
    specs = [SamplerSpec(temperature=1.0, seed=s) for s in (11, 12, 13, 14)]

    def group(ids, with_followers):
        seqs = [Sequence(i, list(prompt), sp, 8) for i, sp in zip(ids, specs)]
        if with_followers:
            seqs[0].followers = seqs[1:]
            return seqs, {0: seqs[:1]}
        return seqs, {0: seqs}
    forked, arrive = group([1, 2, 3, 4], True)
    s1 = _run(m, arrive, caching=False)
    alone, arrive = group([5, 6, 7, 8], False)
    s2 = _run(m, arrive, caching=False)
    assert [s.output for s in forked] == [s.output for s in alone]
    assert len({tuple(s.output) for s in forked}) > 1  # different seeds, different samples
    assert s1.prefill_tokens == len(prompt) and s2.prefill_tokens == 4 * len(prompt)
    greedy = [Sequence(i, list(prompt), SamplerSpec(), 8) for i in range(3)]
    greedy[0].followers = greedy[1:]
    _run(m, {0: greedy[:1]}, budget=5)  # chunked prefill: the fork waits for the last chunk
    assert all(s.output == _solo(m, prompt, 8) for s in greedy)


class EvenOnly:
    """A stand-in grammar: even token ids only, complete after four tokens."""

    def __init__(self, vocab: int) -> None:
        self.vocab, self.n = vocab, 0

    def mask(self) -> bytes:
        bits = torch.zeros(32 * ((self.vocab + 31) // 32), dtype=torch.int64)
        bits[0:self.vocab:2] = 1
        words = (bits.view(-1, 32) << torch.arange(32)).sum(1)
        return words.to(torch.int64).apply_(lambda w: w - (1 << 32) if w >= 1 << 31 else w) \
            .to(torch.int32).numpy().tobytes()

    def advance(self, token: int) -> bool:
        assert token % 2 == 0, token
        self.n += 1
        return self.n == 4


@torch.inference_mode()
def test_token_masks_constrain_sampling_and_finish_the_sequence(m):
    vocab = m.lm_head.num_embeddings
    free = Sequence(1, [5, 6, 7], SamplerSpec(temperature=1.0, seed=3), 12)
    seqs = [Sequence(i, [5, 6, 7], SamplerSpec(temperature=t, seed=i), 12)
            for i, t in ((2, 0.0), (3, 1.0), (4, 1.5))]
    for s in seqs:
        s.grammar = EvenOnly(vocab)
    _run(m, {0: [free, *seqs]})
    assert any(t % 2 for t in free.output) and len(free.output) == 12
    for s in seqs:
        assert len(s.output) == 4 and all(t % 2 == 0 for t in s.output), s.output


@torch.inference_mode()
def test_prompt_logprobs_equal_the_full_forward(m):
    prompt = [3, 17, 99, 4, 250, 8, 61, 12, 9, 33]
    seq = Sequence(1, list(prompt), SamplerSpec(logprobs=2, prompt_logprobs=3), 2)
    runner = Runner(m, None, PagedKVCache(m, 16, BS))
    sched = Scheduler(16, BS, max_batched_tokens=4)  # three chunks
    sched.add(seq)
    got: list = []
    while sched.has_work():
        _, prompt_events, _ = run_step(runner, sched, sched.schedule())
        got += [e for _, entries in prompt_events for e in entries]
    lp = m(torch.tensor([prompt]))[0].double().log_softmax(-1)            # (len, V)
    assert [t for t, _, _ in got] == prompt[1:]
    for i, (t, v, top) in enumerate(got):
        assert abs(v - float(lp[i, t])) < 1e-4
        want = lp[i].topk(3)
        assert [a for a, _ in top] == want.indices.tolist()
        assert max(abs(b - c) for (_, b), c in zip(top, want.values.tolist())) < 1e-4
