"""A server no request can take down: each finding of issue 18 against the real server (the small
random ``debug`` model at tp=2, an API key, small limits) through the official openai client, then
schemathesis (bodies from the server's own OpenAPI schema, valid and invalid) and hypothesis
(what the schema cannot say: sizes, nesting, NaN, huge integers, the vocabulary). Passing means
no 500, no worker death, and no KV block or in-flight slot held once the requests are done.
One server for the module; every loop is bounded in count."""
from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import negative_data_rejection

from test_serve_util import Server

MODEL, KEY = "debug", "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
FUZZ = settings(deadline=None, database=None, derandomize=True, print_blob=False,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server():
    s = Server("--model", MODEL, "--tp", "2", "--api-key", KEY, "--max-seqs", "4",
               "--max-queue", "2", "--max-prompt-tokens", "200", "--kv-tokens", "1024")
    # eager steps: what is hardened is the server; the compiled one is test_serve's
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=60, max_retries=0)


def chat(client, **kw):
    return client.chat.completions.create(**{
        "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **kw})


def post(server, path: str, body, headers=AUTH, **kw) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=data, timeout=60,
                      headers={"content-type": "application/json", **headers}, **kw)


def metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                     if line.startswith("shardwise_"))}


def assert_unharmed(server, workers: list[int]) -> None:
    """The same workers serve, and nothing is held once every request has finished."""
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["workers"] == workers, health
    server_metrics = {}
    for _ in range(100):  # the engine's gauges follow its last report
        server_metrics = metrics(server)
        if server_metrics["shardwise_kv_blocks_used"] == 0 and \
                server_metrics["shardwise_requests_in_flight"] == 0:
            break
        httpx.get(server.url + "/health", timeout=10)
    assert server_metrics["shardwise_kv_blocks_used"] == 0, server_metrics
    assert server_metrics["shardwise_requests_in_flight"] == 0, server_metrics
    assert server_metrics["shardwise_requests_running"] == 0, server_metrics
    assert not any(k.startswith('shardwise_requests_rejected_total{status="5') for k in
                   server_metrics), server_metrics


@pytest.fixture(scope="module")
def workers(server):
    return httpx.get(server.url + "/health", timeout=10).json()["workers"]


def test_findings_through_the_openai_client(server, client, workers):
    with pytest.raises(openai.BadRequestError) as e:  # killed the worker before
        chat(client, seed=2**80)
    assert e.value.param == "seed" and "9223372036854775807" in e.value.message
    a, b = (chat(client, seed=-(2**63), temperature=1.0) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content
    unsupported = [
        ("presence_penalty", dict(presence_penalty=0.5)),
        ("messages[0].content[1]", dict(messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])),
    ]
    for param, kw in unsupported:
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, **kw)
        assert e.value.param == param and e.value.code == "unsupported_parameter", param
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, best_of=2)
    assert e.value.param == "best_of"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for param, kw in (("tool_choice", dict(tool_choice="required")),
                      ("tool_choice", dict(tools=tools, tool_choice={
                          "type": "function", "function": {"name": "g"}})),
                      ("tools", dict(tools=tools * 2)),
                      ("response_format", dict(response_format={"type": "json_schema",
                                                                "json_schema": {
                                                                    "name": "x", "schema": {
                                                                        "type": "nonsense"}}})),
                      ("n", dict(n=200))):
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, **kw)
        assert e.value.param == param, (param, e.value.message)
    with pytest.raises(openai.BadRequestError) as e:  # a typo is not silently ignored
        chat(client, extra_body={"max_token": 3})
    assert e.value.param == "max_token"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1, 2, 49152], max_tokens=2)
    assert "[0, 49152)" in e.value.message
    assert chat(client, response_format={"type": "text"}).usage.completion_tokens == 4
    assert_unharmed(server, workers)


def test_bodies_too_deep_too_large_or_not_finite(server, client, workers):
    deep = "[" * 100_000 + "]" * 100_000  # a RecursionError and a reset connection before
    r = post(server, "/v1/chat/completions", deep)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_deep", r.text
    huge = b'{"model": "debug", "prompt": "' + b"x" * (9 << 20) + b'"}'
    r = post(server, "/v1/completions", huge)
    assert r.status_code == 413 and "8388608 bytes" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", '{"model": "debug", "prompt": "x", "temperature": NaN}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "[" * 100, "max_tokens": 2})
    assert r.status_code == 200, r.text  # brackets inside strings are not nesting
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "text", "text": 5}]}]})
    assert r.json()["error"]["param"] == "messages[0].content[0].text", r.text
    assert httpx.get(server.url + "/v1/nowhere", headers=AUTH).json()["error"]["message"]
    assert_unharmed(server, workers)


def test_api_key_on_every_route_but_health(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for path in ("/v1/models", "/metrics", "/openapi.json"):
        r = httpx.get(server.url + path, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert httpx.get(server.url + path, headers=AUTH, timeout=10).status_code == 200
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x"}, headers={})
    assert r.status_code == 401
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_prompt_and_in_flight_limits_name_the_numbers(server, client, workers):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=list(range(1, 202)), max_tokens=2)
    assert "at most 200" in e.value.message and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2000)
    assert "KV cache of 1024 tokens" in e.value.message

    def long(_):
        return post(server, "/v1/completions", {"model": MODEL, "prompt": "hi",
                                                "max_tokens": 60, "ignore_eos": True})
    with cf.ThreadPoolExecutor(10) as ex:
        rs = list(ex.map(long, range(10)))
    codes = [r.status_code for r in rs]
    assert codes.count(429) >= 1 and codes.count(200) >= 6 and set(codes) == {200, 429}, codes
    msg = next(r for r in rs if r.status_code == 429).json()["error"]["message"]
    assert "4 running + 2 queued" in msg
    assert_unharmed(server, workers)


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json", headers=AUTH, timeout=30)


def _bounded(body) -> None:
    """Keep a valid body's generation short and aimed at the served model."""
    if isinstance(body, dict):
        body["model"] = MODEL
        for k in ("max_tokens", "max_completion_tokens"):
            body[k] = body[k] % 4 + 1 if isinstance(body.get(k), int) and body[k] > 0 else 2


def test_schemathesis_from_the_openapi_schema(server, api_schema, workers):
    ops = [api_schema[p][m] for p, m in (("/v1/chat/completions", "POST"),
                                         ("/v1/completions", "POST"), ("/v1/models", "GET"),
                                         ("/health", "GET"))]
    seen = {"positive": set(), "negative": set()}

    @settings(FUZZ, max_examples=120)
    @given(st.data())
    def run(data):
        op = data.draw(st.sampled_from(ops))
        mode = data.draw(st.sampled_from([GenerationMode.POSITIVE, GenerationMode.NEGATIVE]))
        case = data.draw(op.as_strategy(generation_mode=mode))
        checks = [not_a_server_error]
        if mode is GenerationMode.POSITIVE:
            _bounded(case.body)
        elif op.method.upper() == "POST":
            checks.append(negative_data_rejection)
        resp = case.call(base_url=server.url, headers=AUTH, timeout=60)
        case.validate_response(resp, checks=checks)
        seen[mode.value].add(resp.status_code)
    run()
    assert 200 in seen["positive"] and seen["negative"] <= {200, 400, 404, 405, 413}, seen
    assert_unharmed(server, workers)


def _extreme_ints():
    return st.one_of(st.integers(-(2**70), 2**70), st.sampled_from(
        [2**63, 2**63 - 1, -(2**63) - 1, 2**80, -1, 0, 49152, 2**31]))


VALUES = st.recursive(st.one_of(st.none(), st.booleans(), _extreme_ints(),
                                st.floats(allow_nan=True, allow_infinity=True),
                                st.text(max_size=20)),
                      lambda inner: st.lists(inner, max_size=3) |
                      st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
FIELDS = ["seed", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
          "stop", "logprobs", "top_logprobs", "stream", "stream_options", "ignore_eos", "echo",
          "logit_bias", "best_of", "prompt", "messages", "tools", "response_format"]


@st.composite
def bodies(draw) -> tuple[str, bytes]:
    """A body the schema cannot describe: valid fields with extreme values, NaN and Infinity
    literals, token ids beyond the vocabulary, deep nesting inside fields."""
    chat = draw(st.booleans())
    body = {"model": MODEL, "max_tokens": 2}
    body.update({"messages": [{"role": "user", "content": draw(st.text(max_size=30))}]}
                if chat else {"prompt": draw(st.one_of(st.text(max_size=30),
                                                       st.lists(_extreme_ints(), min_size=1,
                                                                max_size=5)))})
    for k in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        body[k] = draw(VALUES)
    text = json.dumps(body, allow_nan=True)
    depth = draw(st.sampled_from([0, 0, 0, 63, 65, 5000]))
    if depth:
        text = text[:-1] + ', "stop": ' + "[" * depth + "]" * depth + "}"
    return ("/v1/chat/completions" if chat else "/v1/completions"), text.encode()


def test_hypothesis_bodies_beyond_the_schema(server, workers):
    statuses = set()

    @settings(FUZZ, max_examples=100)
    @given(bodies())
    def run(pb):
        path, data = pb
        r = post(server, path, data)
        assert r.status_code < 500, (data[:300], r.text)
        if r.status_code != 200:
            err = r.json()["error"]
            assert err["message"] and err["type"], r.text
        statuses.add(r.status_code)
    run()
    assert {200, 400} <= statuses, statuses
    assert_unharmed(server, workers)
