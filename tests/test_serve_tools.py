"""Tool calls without a server: the prompt (generic and a template's own), the grammar of each
``tool_choice``, and the parser that streams calls out of text, however the text is cut."""
from __future__ import annotations

import json
import random

import pytest

from shardwise.serve.grammar import Grammars, json_grammar
from shardwise.serve.protocol import ChatRequest, message_text
from shardwise.serve.tools import ToolStream, chat_messages, renders_tools, tool_grammar

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TWO = CALL + '\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'


def req(**kw) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS, **kw})


@pytest.fixture(scope="module")
def tokenizer():
    from shardwise.checkpoint.source import load_tokenizer, resolve
    return load_tokenizer(resolve("smollm2-135m"))


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return Grammars(lambda: tokenizer, vocab=49152, eos_ids=[2])


def _accepts(grammars, grammar: str, text: str, tokenizer) -> bool:
    c = grammars.constraint(grammar)
    for t in tokenizer(text, add_special_tokens=False)["input_ids"]:
        if not c.matcher.consume_token(t):
            return False
    return c.matcher.is_accepting()


def test_stream_parser_splits_calls_however_the_text_is_cut():
    rng = random.Random(0)
    for text in (CALL, TWO):
        whole = ToolStream()
        whole.feed(text)
        msg = whole.message()
        for _ in range(20):
            p, deltas, i = ToolStream(), [], 0
            while i < len(text):
                j = i + rng.randint(1, 7)
                deltas += p.feed(text[i:j])
                i = j
            calls: dict[int, dict] = {}
            for d in deltas:
                for tc in d["tool_calls"]:
                    c = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
                    c["name"] += tc["function"].get("name") or ""
                    c["arguments"] += tc["function"]["arguments"]
            assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
                [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                 for c in msg["tool_calls"]]
    assert [c["function"]["arguments"] for c in msg["tool_calls"]] == ['{"city": "Paris"}', "{}"]
    t = ToolStream()
    assert t.feed("<") == [] and t.feed("b>old") == [{"content": "<b>old"}]
    assert t.message() == {"role": "assistant", "content": "<b>old"}
    cut = ToolStream()
    cut.feed("<tool_call>\n{\"na")  # max_tokens hit inside the header: the text stays
    assert cut.message()["content"].startswith("<tool_call>")


def test_generic_prompt_history_and_the_native_template(tokenizer):
    assert not renders_tools(tokenizer)
    r = req(tool_choice={"type": "function", "function": {"name": "now"}}, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "21 C"}])
    msgs, extra = chat_messages(r, tokenizer, message_text)
    assert extra == {} and [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("Be brief.") and '"name": "get_weather"' in \
        msgs[0]["content"] and msgs[0]["content"].endswith("Call the function now now.")
    assert msgs[2]["content"] == CALL
    assert msgs[3]["content"] == "<tool_response>\nsunny\n</tool_response>\n" \
        "<tool_response>\n21 C\n</tool_response>"
    msgs, _ = chat_messages(req(tool_choice="none"), tokenizer, message_text)
    assert msgs == [{"role": "user", "content": "Weather in Paris?"}]

    class Native:  # a template that renders tools itself (as Qwen2.5's and Hermes' do)
        chat_template = "{% for t in tools %}{{ t }}{% endfor %}<tool_call>"
    msgs, extra = chat_messages(r, Native(), message_text)
    assert [t["function"]["name"] for t in extra["tools"]] == ["get_weather", "now"]
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert msgs[3] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


def test_each_tool_choice_has_its_grammar(grammars, tokenizer):
    assert tool_grammar(req(tool_choice="none"), None) is None
    g = tool_grammar(req(tool_choice="required"), None)
    assert _accepts(grammars, g, CALL, tokenizer) and _accepts(grammars, g, TWO, tokenizer)
    assert not _accepts(grammars, g, "It is sunny.", tokenizer)
    assert not _accepts(grammars, g, CALL.replace("Paris", "Paris\", \"x\": \"1"), tokenizer)
    one = tool_grammar(req(tool_choice="required", parallel_tool_calls=False), None)
    assert _accepts(grammars, one, CALL, tokenizer) and not _accepts(grammars, one, TWO,
                                                                     tokenizer)
    named = tool_grammar(req(tool_choice={"type": "function", "function": {"name": "now"}}),
                         None)
    assert not _accepts(grammars, named, CALL, tokenizer)
    assert _accepts(grammars, named, '<tool_call>\n{"name": "now", "arguments": {}}\n'
                                     '</tool_call>', tokenizer)
    auto = tool_grammar(req(), None)
    assert _accepts(grammars, auto, CALL, tokenizer)
    assert _accepts(grammars, auto, "It is sunny.", tokenizer)
    from shardwise.serve.grammar import lark_json
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    both = tool_grammar(req(), lark_json(schema))
    assert _accepts(grammars, both, '{"ok": true}', tokenizer)
    assert not _accepts(grammars, both, "It is sunny.", tokenizer)
    assert _accepts(grammars, json_grammar(schema), '{"ok": false}', tokenizer)
