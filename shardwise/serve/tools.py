"""Tool calls: the prompt that shows the model its tools, the grammar that holds it to the call
format, and the parser that turns its text into OpenAI's ``tool_calls``, streaming included.

The call format is the one Hermes and Qwen2.5 chat templates use, one block per call::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

* **Prompt.** A chat template that renders tools itself (its source mentions ``tools`` and
  ``<tool_call>``) gets them through ``apply_chat_template(..., tools=...)``, with earlier calls as
  assistant ``tool_calls`` and results as ``tool`` messages. Any other template (SmolLM2's renders
  neither) gets the *generic tool prompt* (:data:`GENERIC_PROMPT`) appended to the system message:
  the tools as JSON, the format above, and for ``required`` or a named function the instruction to
  call; earlier calls are written back in that format, and results as
  ``<tool_response>...</tool_response>`` user messages.
* **Grammar.** ``required``: one or more calls (exactly one when ``parallel_tool_calls`` is false),
  each one of the tools with arguments valid under its parameter schema; a named function: calls of
  that function; ``auto``: the same calls, or text that does not begin with ``<`` (or, with a
  ``response_format``, that JSON); ``none``: no tools in a generic prompt, nothing enforced.
* **Parser** (:class:`ToolStream`): the answer is text or calls, decided by its first characters;
  a call's ``id`` and ``name`` go out as soon as its header is complete, its arguments as they are
  generated (compact JSON has no raw newline, so the first newline after the arguments ends them).
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

from .grammar import lark_grammar, lark_json, lark_literal

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
GENERIC_PROMPT = (
    "You can call the following functions. Each is described by a JSON object with its name, "
    "what it does and a JSON schema of its arguments:\n{tools}\n\n"
    "To call functions, answer only with one block per call, in this format:\n"
    "<tool_call>\n{{\"name\": \"<function name>\", \"arguments\": <the arguments as a JSON "
    "object>}}\n</tool_call>\n"
    "The results come back in a message inside <tool_response></tool_response>. "
    "If no function is needed, answer in plain text.")
MUST_CALL = "\nCall one or more functions now."
MUST_CALL_ONE = "\nCall the function {name} now."
_HEADER = re.compile(r'<tool_call>\n\{"name": "([a-zA-Z0-9_-]+)", "arguments": ')


def renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders tools in the ``<tool_call>`` format."""
    t = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(t, str) and "tools" in t and "<tool_call>" in t


def _call_text(name: str, arguments: str) -> str:
    return f'{OPEN}{{"name": "{name}", "arguments": {arguments}}}{CLOSE}'


def chat_messages(req: Any, tokenizer: Any, text_of) -> tuple[list[dict], dict[str, Any]]:
    """The messages and keyword arguments for ``tokenizer.apply_chat_template``."""
    native = renders_tools(tokenizer)
    msgs: list[dict] = []
    for m in req.messages:
        role, text = ("system" if m.role == "developer" else m.role), text_of(m)
        calls = getattr(m, "tool_calls", None) or []
        if role == "tool":
            if native:
                msgs.append({"role": "tool", "content": text, "tool_call_id": m.tool_call_id})
            else:  # consecutive results become one message
                block = f"<tool_response>\n{text}\n</tool_response>"
                if msgs and msgs[-1].get("tool_results"):
                    msgs[-1]["content"] += "\n" + block
                else:
                    msgs.append({"role": "user", "content": block, "tool_results": True})
        elif calls and native:
            msgs.append({"role": "assistant", "content": text, "tool_calls": [
                {"type": "function", "id": c.id, "function": {
                    "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                for c in calls]})
        elif calls:
            body = "\n".join(_call_text(c.function.name, c.function.arguments) for c in calls)
            msgs.append({"role": role, "content": (text + "\n" if text else "") + body})
        else:
            msgs.append({"role": role, "content": text})
    for m in msgs:
        m.pop("tool_results", None)
    tools, choice = req.tools or [], req.tool_choice
    if not tools or choice == "none" and not native:
        return msgs, {}
    if native:
        return msgs, {"tools": [t.model_dump(exclude_none=True) for t in tools]}
    listing = "\n".join(json.dumps(t.function.model_dump(exclude_none=True)) for t in tools)
    note = GENERIC_PROMPT.format(tools=listing)
    if choice == "required":
        note += MUST_CALL
    elif choice is not None and not isinstance(choice, str):
        note += MUST_CALL_ONE.format(name=choice.function.name)
    if msgs and msgs[0]["role"] == "system":
        msgs[0] = {"role": "system", "content": msgs[0]["content"] + "\n\n" + note}
    else:
        msgs.insert(0, {"role": "system", "content": note})
    return msgs, {}


def _json_or_text(s: str) -> Any:
    try:
        return json.loads(s)
    except ValueError:
        return s


def tool_grammar(req: Any, answer: str | None) -> str | None:
    """The grammar of the answer under ``tool_choice``; ``answer`` is the Lark item of a
    non-tool answer allowed by ``auto`` (a ``%json`` item), default: text not starting with
    ``<``. ``None`` when nothing is enforced."""
    tools, choice = req.tools or [], req.tool_choice or "auto"
    if not tools or choice == "none":
        return None
    if not isinstance(choice, str):
        tools = [t for t in tools if t.function.name == choice.function.name]
    rules = []
    for i, t in enumerate(tools):
        f = t.function
        head = lark_literal(f'{OPEN}{{"name": "{f.name}", "arguments": ')
        rules.append(f"call_{i}: {head} {lark_json(f.parameters, strict=bool(f.strict))} "
                     f"{lark_literal('}' + CLOSE)}")
    many = req.parallel_tool_calls is not False
    top = "calls" if choice != "auto" else f"calls | {answer or 'TEXT'}"
    lines = [f"start: {top}",
             "calls: call" + (' ("\\n" call)*' if many else ""),
             "call: " + " | ".join(f"call_{i}" for i in range(len(tools))), *rules]
    if choice == "auto" and answer is None:
        lines.append(r"TEXT: /[^<][\s\S]*/")
    return lark_grammar("\n".join(lines))


class ToolStream:
    """Splits the answer's text, fed in pieces, into content and tool calls."""

    def __init__(self) -> None:
        self.buf, self.mode = "", None       # None: undecided; "text" or "calls"
        self.calls: list[dict] = []          # {"id", "name", "arguments"} of every call begun
        self._pos = 0                        # where the next unparsed call text starts
        self._args: int | None = None        # start of the current call's arguments
        self._sent = 0                       # how much of them went out

    def feed(self, text: str) -> list[dict]:
        """Deltas for the new text: ``{"content": ...}`` or ``{"tool_calls": [...]}``."""
        self.buf += text
        if self.mode is None:
            head = self.buf.lstrip()
            if not head or (len(head) < len(OPEN) and OPEN.startswith(head)):
                return []
            self.mode = "calls" if head.startswith(OPEN) else "text"
            if self.mode == "text":
                return [{"content": self.buf}]
        if self.mode == "text":
            return [{"content": text}] if text else []
        return self._parse()

    def _parse(self) -> list[dict]:
        out = []
        while True:
            if self._args is None:
                m = _HEADER.search(self.buf, self._pos)
                if m is None:
                    return out
                self._args = self._sent = m.end()
                k = len(self.calls)
                self.calls.append({"id": "call_" + uuid.uuid4().hex[:24], "name": m.group(1),
                                   "arguments": ""})
                out.append({"tool_calls": [{"index": k, "id": self.calls[k]["id"],
                                            "type": "function", "function": {
                                                "name": m.group(1), "arguments": ""}}]})
            end = self.buf.find("\n", self._args)
            stop = len(self.buf) - 1 if end < 0 else end - 1   # hold back the closing brace
            if stop > self._sent:
                piece = self.buf[self._sent:stop]
                self.calls[-1]["arguments"] += piece
                out.append({"tool_calls": [{"index": len(self.calls) - 1,
                                            "function": {"arguments": piece}}]})
                self._sent = stop
            if end < 0:
                return out
            self._pos, self._args = end, None

    def flush(self) -> list[dict]:
        """At the end: text still undecided is content."""
        if self.mode is None and self.buf:
            self.mode = "text"
            return [{"content": self.buf}]
        return []

    def message(self) -> dict[str, Any]:
        """The whole answer as an assistant message (``content`` or ``tool_calls``); a call cut
        before its name was complete leaves the text as content."""
        if self.mode != "calls" or not self.calls:
            return {"role": "assistant", "content": self.buf}
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}} for c in self.calls]}
