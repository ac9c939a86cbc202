"""What OpenAI clients expect, through the official ``openai`` client against the real server
(SmolLM2-135M, tp=2, a small KV cache so that the prefix cache must evict): structured output,
tool calls (streaming included, results fed back), prefix caching (the same tokens with and
without a hit, and after eviction), ``n`` samples from one prefill, batched prompts, echo with
the prompt's log-probabilities. One server for the module; few tokens per request."""
from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from test_serve_util import Server

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def server():
    s = Server("--model", MODEL, "--tp", "2", "--kv-tokens", "640")  # 40 blocks of 16
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=120, max_retries=0)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class Pet(BaseModel):
    name: str = Field(max_length=24)
    kind: Literal["cat", "dog", "fish"]
    age: int


def test_structured_output_parses_and_validates(client):
    r = client.chat.completions.parse(model=MODEL, messages=user("Describe a pet as JSON."),
                                      response_format=Pet, max_tokens=40, temperature=0)
    assert isinstance(r.choices[0].message.parsed, Pet), r
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "sizes": {"type": "array", "items": {"enum": ["S", "M", "L"]}, "minItems": 1,
                  "maxItems": 3},
        "score": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["city", "sizes", "score"], "additionalProperties": False}
    r = client.chat.completions.create(model=MODEL, messages=user("A city as JSON."), n=3,
                                       temperature=1.0, seed=5, max_tokens=48,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "city", "schema": schema, "strict": True}})
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), schema)
    r = client.chat.completions.create(model=MODEL, messages=user("Some JSON, please."),
                                       max_tokens=16, temperature=0,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the start of an object
        assert r.choices[0].message.content.startswith("{")


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                 "maxLength": 30}},
                       "required": ["city"], "additionalProperties": False}}}]
ASK = user("What is the weather in Paris?")


def _call(msg):
    [call] = msg.tool_calls
    tool = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return call, args


def test_tool_calls_required_named_streamed_and_answered(client):
    kw = dict(model=MODEL, tools=TOOLS, max_tokens=48, temperature=0, parallel_tool_calls=False)
    r = client.chat.completions.create(messages=ASK, tool_choice="required", **kw)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    call, _ = _call(r.choices[0].message)
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(messages=ASK, tool_choice=named, **kw)
    call, args = _call(r.choices[0].message)
    assert call.function.name == "get_time" and call.id.startswith("call_")
    ids, names, arguments, finish = set(), "", "", None
    for ch in client.chat.completions.create(messages=ASK, tool_choice=named, stream=True, **kw):
        for c in ch.choices:
            for d in c.delta.tool_calls or []:
                assert d.index == 0
                ids.add(d.id)
                names += d.function.name or ""
                arguments += d.function.arguments or ""
            finish = c.finish_reason or finish
    assert (names, json.loads(arguments), finish) == ("get_time", args, "tool_calls")
    assert len(ids - {None}) == 1
    history = ASK + [{"role": "assistant", "tool_calls": [
        {"id": call.id, "type": "function", "function": {
            "name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "14:05, sunny, 21 C"}]
    r = client.chat.completions.create(messages=history, tool_choice="none",
                                       **{**kw, "max_tokens": 12})
    m = r.choices[0].message
    assert m.tool_calls is None and m.content, m
    r = client.chat.completions.create(messages=history, tool_choice="auto", **kw)
    m = r.choices[0].message  # SmolLM2 tends to call again: a valid call, or text
    assert m.content or _call(m), m


LONG = ("You are a careful assistant for a small bakery. The bakery sells bread, croissants, "
        "cakes and coffee, opens at seven in the morning and closes at six in the evening, "
        "except on Sundays, when it closes at noon. Answer briefly and politely. ") * 3


def test_prefix_cache_same_tokens_with_and_without_and_after_eviction(server, client):
    def ask(q: str) -> str:
        r = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0, messages=[
            {"role": "system", "content": LONG}, {"role": "user", "content": q}])
        return r.choices[0].message.content

    m0 = server.metrics()
    cold = ask("When do you open on Sunday?")
    m1 = server.metrics()
    warm = ask("When do you open on Sunday?")
    m2 = server.metrics()
    hit = lambda a, b: b["shardwise_prefix_cache_hit_tokens_total"] - \
        a["shardwise_prefix_cache_hit_tokens_total"]
    assert warm == cold and hit(m1, m2) >= 160 > hit(m0, m1), (hit(m0, m1), hit(m1, m2))
    assert ask("Do you sell cakes?")  # shares the system prompt: a hit of its blocks
    assert hit(m2, server.metrics()) >= 160
    for i in range(4):  # other long prompts fill the 40 blocks: the bakery's get evicted
        client.completions.create(model=MODEL, prompt=f"{i} " + LONG.replace("bakery", f"shop{i}"),
                                  max_tokens=2)
    m3 = server.metrics()
    assert m3["shardwise_prefix_cache_evictions_total"] > 0
    assert ask("When do you open on Sunday?") == cold
    assert m3["shardwise_kv_blocks_cached"] <= m3["shardwise_kv_blocks_total"]


def test_n_samples_cost_one_prefill_and_batched_prompts(server, client):
    prompt = "Three facts about the moon: the first is that it"
    before = server.metrics()
    r = client.completions.create(model=MODEL, prompt=prompt, n=4, max_tokens=6, temperature=0)
    after = server.metrics()
    n_prompt = r.usage.prompt_tokens
    prefill = after["shardwise_prefill_tokens_total"] - before["shardwise_prefill_tokens_total"]
    assert prefill == n_prompt and r.usage.completion_tokens == 24  # one prefill, four samples
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert len({c.text for c in r.choices}) == 1  # greedy: four equal samples
    sampled = [client.completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=6,
                                         temperature=1.0, seed=9) for _ in range(2)]
    texts = [[c.text for c in s.choices] for s in sampled]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1  # seeded: repeatable, and varied
    other = "Two colours of the sea are"
    b = client.completions.create(model=MODEL, prompt=[prompt, other], n=2, max_tokens=6,
                                  temperature=0)
    solo = client.completions.create(model=MODEL, prompt=other, max_tokens=6, temperature=0)
    assert [c.text for c in b.choices] == [r.choices[0].text] * 2 + [solo.choices[0].text] * 2
    assert b.usage.prompt_tokens == n_prompt + solo.usage.prompt_tokens
    parts: dict[int, str] = {}
    for ch in client.chat.completions.create(model=MODEL, messages=user("Name a fruit."), n=2,
                                             max_tokens=6, temperature=0, stream=True):
        for c in ch.choices:
            parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
    assert set(parts) == {0, 1} and parts[0] == parts[1] and parts[0]


def test_echo_with_prompt_logprobs(client):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=3,
                                  max_tokens=3, temperature=0)
    c = r.choices[0]
    lp = c.logprobs
    assert c.text.startswith(prompt) and "".join(lp.tokens) == c.text
    assert len(lp.tokens) == r.usage.prompt_tokens + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and lp.text_offset[0] == 0
    # the prompt's top log-probabilities at position 3 are what generating from its first
    # three tokens gives
    head = client.completions.create(model=MODEL, prompt="The capital of", max_tokens=1,
                                     temperature=0, logprobs=3)
    gen = head.choices[0].logprobs
    assert lp.top_logprobs[3].keys() == gen.top_logprobs[0].keys()
    for k, v in gen.top_logprobs[0].items():
        assert abs(lp.top_logprobs[3][k] - v) < 1e-3, (k, v, lp.top_logprobs[3])
    s = client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=3,
                                  temperature=0, stream=True)
    assert "".join(x.choices[0].text for x in s if x.choices) == c.text
