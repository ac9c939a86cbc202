"""Vocabulary-parallel sampling: the same tokens as sampling the gathered logits, at any tp."""
import json
import subprocess
import sys

import pytest
import torch

from shardwise.sampling import (SamplingParams, _filter, gumbel, mask_words, parallel_logprobs,
                                sample)

VOCAB = 50


def _logits(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, VOCAB, generator=g) * 3
    z[0, 7] = z[0, 31] = z[0].max() + 1  # a tie: the lowest index wins, as torch.argmax
    return z


def sample_worker(tp, params):
    from shardwise.layers import VocabParallelEmbedding
    from shardwise.mesh import subgroup
    group = subgroup(list(range(tp)))
    if torch.distributed.get_rank() >= tp:
        return None
    emb = VocabParallelEmbedding(VOCAB, 1, group=group)
    z = torch.nn.functional.pad(_logits(), (0, emb.partition.padded - VOCAB), value=float("-inf"))
    local = z[:, emb.start:emb.stop]
    gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
    return [sample(local, params, gens, start=emb.start, vocab=VOCAB, group=group).tolist()
            for _ in range(3)]  # three successive draws: generators advance identically


PARAMS = [SamplingParams(), SamplingParams(temperature=0.8, seed=1),
          SamplingParams(temperature=1.0, top_k=5, seed=2),
          SamplingParams(temperature=1.2, top_p=0.7, seed=3),
          SamplingParams(temperature=0.5, top_k=3, top_p=0.9, seed=4), SamplingParams()]


def test_same_tokens_at_every_tp(pool):
    results = {}
    for tp in (1, 2, 3, 4):
        results[tp] = [r for r in pool.run(sample_worker, tp, PARAMS) if r]
        assert all(r == results[tp][0] for r in results[tp])  # every rank agrees
    assert all(results[tp][0] == results[1][0] for tp in (2, 3, 4)), results
    z = _logits()
    assert results[1][0][0][0] == 7 and results[1][0][0][0] == int(z[0].argmax())
    assert results[1][0][0][5] == int(z[5].argmax())


def _masks(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed masks (n, words) int32 and the same as booleans (n, VOCAB): row i allows a random
    set of tokens, row 0 exactly one, the last row everything (an unconstrained row)."""
    g = torch.Generator().manual_seed(5)
    allowed = torch.rand(n, VOCAB, generator=g) < 0.3
    allowed[0] = False
    allowed[0, 42] = True
    allowed[-1] = True
    bits = torch.zeros(n, 32 * mask_words(VOCAB), dtype=torch.int64)
    bits[:, :VOCAB] = allowed.long()
    words = (bits.view(n, -1, 32) << torch.arange(32)).sum(-1)            # (n, words) uint32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32), allowed


def masked_worker(tp, params):
    from shardwise.layers import VocabParallelEmbedding
    from shardwise.mesh import subgroup
    group = subgroup(list(range(tp)))
    if torch.distributed.get_rank() >= tp:
        return None
    emb = VocabParallelEmbedding(VOCAB, 1, group=group)
    z = torch.nn.functional.pad(_logits(), (0, emb.partition.padded - VOCAB), value=float("-inf"))
    local = z[:, emb.start:emb.stop]
    packed, _ = _masks(len(params))
    gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
    toks = sample(local, params, gens, start=emb.start, vocab=VOCAB, group=group, mask=packed)
    chosen, vals, ids = parallel_logprobs(local, toks, 4, start=emb.start, vocab=VOCAB,
                                          group=group)
    return toks.tolist(), chosen.tolist(), vals.tolist(), ids.tolist()


def test_masked_sampling_and_logprobs_at_every_tp(pool):
    """Every rank masks its own slice; the tokens are the same at any tp, always allowed, and
    the unmasked rows are those of plain sampling; log-probabilities equal the full softmax."""
    params = PARAMS[:5] + [SamplingParams(temperature=0.9, seed=8)]
    results = {}
    for tp in (1, 2, 3, 4):
        results[tp] = [r for r in pool.run(masked_worker, tp, params) if r]
        assert all(r[0] == results[tp][0][0] for r in results[tp])
    toks = results[1][0][0]
    assert all(results[tp][0][0] == toks for tp in (2, 3, 4)), results
    _, allowed = _masks(len(params))
    assert toks[0] == 42 and all(allowed[i, t] for i, t in enumerate(toks))
    gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
    assert toks[-1] == sample(_logits(), params, gens, start=0, vocab=VOCAB, group=None)[-1]
    full = _logits().double().log_softmax(-1)
    top = full.topk(4)
    for tp in (1, 2, 3, 4):
        _, chosen, vals, ids = results[tp][0]
        want = full.gather(1, torch.tensor(toks)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(chosen, dtype=torch.float64), want, atol=1e-9)
        assert ids[1:] == top.indices[1:].tolist()  # row 0 has a tie: the lower id first
        assert ids[0][:2] == [7, 31]
        assert torch.allclose(torch.tensor(vals, dtype=torch.float64), top.values, atol=1e-9)


def test_sampling_follows_the_filtered_softmax():
    """Gumbel-max draws match softmax(z / T) restricted to the top-k / nucleus set."""
    z = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for top_k, top_p in ((0, 1.0), (3, 1.0), (0, 0.8)):
        row = _filter(z / 0.9, top_k, top_p)
        counts = torch.zeros(6)
        for _ in range(4000):
            counts[int((row + gumbel(6, g)).argmax())] += 1
        expect = row.softmax(-1)
        assert torch.allclose(counts / 4000, expect.float(), atol=0.03), (top_k, top_p, counts)
        if top_k:
            assert (counts[top_k:] == 0).all()


def test_params_are_validated():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                dict(max_tokens=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_generate_json_stop_seed_and_top_k(capsys):
    """--json: stdout is exactly one JSON object; --stop cuts the text; at temperature 5 a seed
    repeats and the draw is not greedy, while --top-k 1 makes even temperature 5 greedy. The
    first call is a real process (what stdout holds); the others run the same ``main`` in this
    process (5-7 s of imports and tokenizer less each)."""
    from shardwise.cli import main
    argv = ["generate", "--model", "smollm2-135m", "--tp", "1", "--prompt",
            "What is the capital of France?", "--max-new-tokens", "12", "--json",
            "--no-compile"]  # sampling, not compilation
    out = subprocess.run([sys.executable, "-m", "shardwise.cli", *argv, "--stop", " is"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    greedy = json.loads(out.stdout)

    def gen(*extra):
        capsys.readouterr()
        assert main([*argv, *extra]) == 0
        return json.loads(capsys.readouterr().out)
    assert greedy["text"] == "The capital of France", greedy
    assert set(greedy) == {"text", "token_ids", "signals"}
    a = gen("--temperature", "5", "--top-p", "0.95", "--seed", "7")
    b = gen("--temperature", "5", "--top-p", "0.95", "--seed", "7")
    assert a["token_ids"] == b["token_ids"]
    n = len(greedy["token_ids"])
    assert a["token_ids"][:n] != greedy["token_ids"], (a["text"], greedy["text"])
    k1 = gen("--stop", " is", "--temperature", "5", "--top-k", "1", "--seed", "7")
    assert k1["text"] == greedy["text"] and k1["token_ids"] == greedy["token_ids"]
