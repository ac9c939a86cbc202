"""The real server (SmolLM2-135M, tp=2) through the official ``openai`` client and raw HTTP;
the compiled server against the eager one on the tiny model.

One server for the module; every loop is bounded in count and time.
"""
from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import openai
import pytest

from test_serve_util import Server

MODEL = "smollm2-135m"
PARIS = "What is the capital of France?"


@pytest.fixture(scope="module")
def server():
    s = Server("--model", MODEL, "--tp", "2")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=120, max_retries=0)


def chat(client, content: str, **kw):
    return client.chat.completions.create(**{"model": MODEL, **kw},
                                          messages=[{"role": "user", "content": content}])


def test_models_health_chat_completion_streams(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    r = chat(client, PARIS, temperature=0, max_tokens=20)
    assert "Paris" in r.choices[0].message.content
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    c = client.completions.create(model=MODEL, prompt="The capital of France is",
                                  temperature=0, max_tokens=12)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 12
    parts, usage = [], None
    for ch in client.completions.create(model=MODEL, prompt="The capital of France is",
                                        temperature=0, max_tokens=12, stream=True,
                                        stream_options={"include_usage": True}):
        parts += [x.text for x in ch.choices]
        usage = ch.usage or usage
    assert "".join(parts) == c.choices[0].text and usage.completion_tokens == 12

    parts, finish, usage = [], None, None
    for ch in chat(client, PARIS, temperature=0, max_tokens=20, stream=True,
                   stream_options={"include_usage": True}):
        for x in ch.choices:
            parts.append(x.delta.content or "")
            finish = x.finish_reason or finish
        usage = ch.usage or usage
    assert "".join(parts) == r.choices[0].message.content
    assert finish == r.choices[0].finish_reason and usage.completion_tokens == \
        r.usage.completion_tokens


def test_sampling_seed_top_p_top_k_and_stop(client):
    """Each sampling option changes what is drawn: a seed repeats and another seed differs; a
    nucleus of one token (top_p=0.001) is greedy even at temperature 1.5; with top_k=5 every
    token is among the five most likely (the logprobs are the model's, before sampling)."""
    story = "Tell me a story."
    text = lambda r: r.choices[0].message.content  # noqa: E731
    kw = dict(temperature=1.3, top_p=0.95, max_tokens=12)
    a, b, c = (chat(client, story, seed=s, **kw) for s in (7, 7, 8))
    assert text(a) == text(b) and text(a) != text(c), (text(a), text(c))
    greedy = chat(client, story, temperature=0, max_tokens=12)
    one = chat(client, story, temperature=1.5, top_p=0.001, seed=5, max_tokens=12)
    assert text(one) == text(greedy)
    k = chat(client, story, temperature=1.5, seed=3, max_tokens=12, logprobs=True,
             top_logprobs=5, extra_body={"top_k": 5})
    toks = k.choices[0].logprobs.content
    assert len(toks) == 12
    for t in toks:
        assert t.logprob >= min(x.logprob for x in t.top_logprobs) - 1e-5, (t.token, t.logprob)
    assert any(t.logprob < t.top_logprobs[0].logprob - 1e-5 for t in toks)  # not all greedy
    s = chat(client, PARIS, temperature=0, max_tokens=20, stop=["Paris"])
    assert "Paris" not in s.choices[0].message.content
    assert s.choices[0].finish_reason == "stop"


PROMPTS = [f"Write one sentence about the number {i}." for i in range(8)] + \
    ["What is 2 + 2?", "Name a colour.", "Say hello in French.", "What is the sun?",
     "List three fruits.", "Why is the sky blue?", PARIS, "Describe a cat."]


def _greedy(client, prompt: str):
    r = chat(client, prompt, temperature=0, max_tokens=16, logprobs=True, top_logprobs=2)
    return r.choices[0].message.content, r.choices[0].logprobs.content


def _same_or_near_tie(prompt: str, a, b) -> None:
    """Greedy answers ``(text, logprobs)`` are equal, or first differ at a floating-point
    near-tie: top-two logits within 1e-4."""
    (text_a, lp_a), (text_b, lp_b) = a, b
    if text_a == text_b:
        return
    i = next(i for i, (x, y) in enumerate(zip(lp_a, lp_b)) if x.token != y.token)
    gaps = [abs(lp[i].top_logprobs[0].logprob - lp[i].top_logprobs[1].logprob)
            for lp in (lp_a, lp_b)]
    assert min(gaps) < 1e-4, (prompt, i, text_a, text_b, gaps)


def test_concurrent_greedy_equals_solo(client):
    solo = [_greedy(client, p) for p in PROMPTS]
    with cf.ThreadPoolExecutor(16) as ex:
        together = list(ex.map(lambda p: _greedy(client, p), PROMPTS))
    for p, a, b in zip(PROMPTS, solo, together):
        _same_or_near_tie(p, a, b)


BAD = [
    ("not json", "{bad", 400),
    ("unknown model", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404),
    ("empty messages", {"model": MODEL, "messages": []}, 400),
    ("no messages", {"model": MODEL}, 400),
    ("too long", {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 9000}]}, 400),
    ("max_tokens 0", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                      "max_tokens": 0}, 400),
    ("max_tokens -1", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400),
    ("max_tokens > context", {"model": MODEL, "prompt": "x", "max_tokens": 9000}, 400),
    ("temperature", {"model": MODEL, "prompt": "x", "temperature": 2.5}, 400),
    ("temperature < 0", {"model": MODEL, "prompt": "x", "temperature": -1}, 400),
    ("top_p 0", {"model": MODEL, "prompt": "x", "top_p": 0}, 400),
    ("top_p > 1", {"model": MODEL, "prompt": "x", "top_p": 1.5}, 400),
    ("temperature type", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400),
    ("max_tokens type", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400),
    ("messages type", {"model": MODEL, "messages": "hello"}, 400),
    ("role", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400),
    ("stream type", {"model": MODEL, "prompt": "x", "stream": "yes"}, 400),
    ("empty prompt", {"model": MODEL, "prompt": ""}, 400),
    ("body not object", [1, 2], 400),
]


def test_bad_inputs_get_openai_errors(server, client):
    for name, body, status in BAD:
        path = "/v1/completions" if isinstance(body, dict) and "prompt" in body \
            else "/v1/chat/completions"
        data = body if isinstance(body, str) else json.dumps(body)
        r = httpx.post(server.url + path, content=data, timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"], name
    with pytest.raises(openai.BadRequestError):
        chat(client, "x", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    assert "Paris" in chat(client, PARIS, temperature=0, max_tokens=12).choices[0].message.content
    m = server.metrics()
    assert m['shardwise_requests_rejected_total{status="400"}'] >= len(BAD) - 1


def test_disconnect_frees_blocks_and_metrics_move(server, client):
    before = server.metrics()
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 2000,
                            "temperature": 0, "stream": True, "ignore_eos": True}) as r:
        # hold the line iterator: a `for ... break` would drop it, and httpx closes the
        # connection when its stream generator is finalized (the disconnect would come early)
        it, lines = r.iter_lines(), []
        while len(lines) < 3:
            line = next(it, None)
            assert line is not None, (lines, server.output()[-4000:])
            lines += [line] if line.startswith("data:") else []
        # the gauges follow the engine's reports, which reach the server beside the tokens (not
        # before them): wait for the report that shows the request's blocks, while it streams
        try:
            used = server.wait_metric("shardwise_kv_blocks_used", lambda v: v > 0, timeout_s=10)
        except AssertionError:
            raise AssertionError((lines, server.metrics(), server.output()[-3000:]))
        assert used > 0
        it.close()
    # the connection is closed: the request is cancelled and its blocks come back
    server.wait_metric("shardwise_kv_blocks_used", lambda v: v == 0, timeout_s=30)
    server.wait_metric("shardwise_requests_running", lambda v: v == 0, timeout_s=30)
    after = server.metrics()
    assert after["shardwise_kv_blocks_free"] == after["shardwise_kv_blocks_total"]
    assert after["shardwise_generation_tokens_total"] > before["shardwise_generation_tokens_total"]
    assert after["shardwise_prompt_tokens_total"] > before["shardwise_prompt_tokens_total"]
    assert after["shardwise_time_to_first_token_seconds_count"] > \
        before["shardwise_time_to_first_token_seconds_count"]
    assert after["shardwise_inter_token_latency_seconds_count"] > \
        before["shardwise_inter_token_latency_seconds_count"]
    assert after['shardwise_requests_total{finish_reason="cancelled"}'] >= 1


def test_tp3_answers_as_tp2(client):
    """A tp=3 server (3 query heads, 1 KV head per rank) gives the tp=2 server's greedy answer
    (tp=2 splits the heads 5 + 4 with a shared KV head: another layout, the same model)."""
    want = _greedy(client, PARIS)
    s = Server("--model", MODEL, "--tp", "3")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", timeout=120, max_retries=0)
        got = _greedy(c, PARIS)
        assert "Paris" in got[0], got[0]
        _same_or_near_tie(PARIS, got, want)
        workers = httpx.get(s.url + "/health").json()["workers"]
        assert len(set(workers)) == 3 and s.proc.pid not in workers, workers
    finally:
        s.close()


def test_compiled_server_answers_as_eager():
    """The compiled server (the CPU default) on the tiny random model: its decode graphs built at
    start-up (one for a batch of one, one for every larger bucket), and the eager server's greedy
    answers for requests in flight together (decode batches of 2-4: the larger graph; prompts in
    eager mixed steps). tp=1: compiled == eager across ranks is test_compiled_step's."""
    args = ("--model", "debug", "--tp", "1", "--max-seqs", "4", "--kv-tokens", "1024")
    texts = [f"request {i}: " + "word " * (3 * i) for i in range(4)]
    answers = {}
    for compiled in (True, False):
        s = Server(*args, compile=compiled)
        try:
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", timeout=120, max_retries=0)
            with cf.ThreadPoolExecutor(len(texts)) as ex:
                answers[compiled] = list(ex.map(
                    lambda t: chat(c, t, model="debug", temperature=0, max_tokens=16)
                    .choices[0].message.content, texts))
            log, m = s.output(), s.metrics()
        finally:
            s.close()
        if compiled:
            assert " 2 decode graphs ready" in log, log
            # fewer decode steps than tokens they made: batches above one, the larger graph ran
            count = lambda name: sum(v for k, v in m.items() if k.startswith(f"shardwise_{name}"))
            decode_steps = count("engine_steps_total") - count("engine_mixed_steps_total")
            assert 0 < decode_steps < count("generation_tokens_total") - len(texts), m
    assert answers[True] == answers[False]
    assert all(answers[True]), answers
