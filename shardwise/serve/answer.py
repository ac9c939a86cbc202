"""OpenAI's answer from a request's pieces of text: the JSON body, or server-sent events.

:class:`Choice` builds one choice as its pieces arrive: the text (after the echoed prompt, in
``/v1/completions``), the log-probabilities in the chat or the completions format, and the tool
calls (:class:`.tools.ToolStream`) with ``finish_reason`` ``"tool_calls"``. :func:`collect`
returns the whole answer; :func:`sse` streams it, a chunk per piece and choice.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator

from starlette.responses import StreamingResponse

from .protocol import APIError
from .respond import Piece, Slot
from .tools import ToolStream

if TYPE_CHECKING:
    from .server import ServerState


@dataclass
class Shape:
    """What a request's answer looks like."""
    chat: bool
    head: dict[str, Any]                  # id, created, model
    n_prompt: int                         # prompt tokens of the request (every prompt once)
    logprobs: int | None                  # top log-probabilities per token, or None
    tools: bool = False                   # the answer may be tool calls
    echo: list[tuple[str, list[int]]] | None = None  # per choice: the prompt's text and ids
    include_usage: bool = False           # a last chunk with the usage (stream_options)

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"


def usage(n_prompt: int, n: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}


class Choice:
    """One choice of the answer as it is built."""

    def __init__(self, st: "ServerState", index: int, shape: Shape) -> None:
        self.st, self.index, self.shape = st, index, shape
        self.parser = ToolStream() if shape.tools else None
        self.text: list[str] = []
        self.items: list = []         # (token, logprob or None, top or None)
        self.finish: str | None = None
        self.tokens, self.offset = 0, 0
        self.echoed = shape.echo is None

    def _tok(self, t: int) -> str:
        return self.st.tokenizer.decode([t])

    def _chat_logprobs(self, items: list) -> dict:
        def one(t: int, lp: float) -> dict:
            s = self._tok(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {"content": [{**one(t, lp), "top_logprobs": [one(a, b) for a, b in top]}
                            for t, lp, top in items]}

    def _completion_logprobs(self, items: list) -> dict:
        toks = [self._tok(t) for t, _, _ in items]
        offsets = []
        for s in toks:
            offsets.append(self.offset)
            self.offset += len(s)
        return {"tokens": toks, "token_logprobs": [lp for _, lp, _ in items],
                "top_logprobs": [None if top is None else {self._tok(a): b for a, b in top}
                                 for _, _, top in items], "text_offset": offsets}

    def _logprobs(self, items: list) -> dict | None:
        if self.shape.logprobs is None or not items:
            return None
        return self._chat_logprobs(items) if self.shape.chat else self._completion_logprobs(items)

    def add(self, piece: Piece) -> list[dict[str, Any]]:
        """Take a piece; returns the stream's choice objects for it (possibly none)."""
        text, items = piece.text, list(piece.logprobs)
        if not self.echoed:  # the prompt first: its text and, with logprobs, its tokens'
            prompt_text, ids = self.shape.echo[self.index]
            text = prompt_text + text
            entries = [(t, lp, top) for t, lp, top in (piece.prompt or [])]
            items = ([(ids[0], None, None)] + entries if self.shape.logprobs is not None
                     else []) + items
            self.echoed = True
        self.text.append(text)
        self.tokens, self.finish = piece.tokens, piece.finish
        lp = self._logprobs(items)
        if not self.shape.chat:
            return [{"index": self.index, "text": text, "logprobs": lp,
                     "finish_reason": piece.finish}]
        deltas = self.parser.feed(text) if self.parser else ([{"content": text}] if text else [])
        if piece.finish and self.parser:
            deltas += self.parser.flush()
        if lp is not None and not deltas:
            deltas = [{}]
        out = [{"index": self.index, "delta": d, "logprobs": lp if i == 0 else None,
                "finish_reason": None} for i, d in enumerate(deltas)]
        if piece.finish:
            out.append({"index": self.index, "delta": {}, "logprobs": None,
                        "finish_reason": self.finish_reason})
        return out

    @property
    def finish_reason(self) -> str | None:
        if self.finish == "stop" and self.parser is not None and self.parser.calls:
            return "tool_calls"
        return self.finish

    def final(self) -> dict[str, Any]:
        """The choice of the whole (non-streamed) answer."""
        out: dict[str, Any] = {"index": self.index, "logprobs": None,
                               "finish_reason": self.finish_reason}
        if self.shape.chat:
            items = self.items
            out["logprobs"] = self._chat_logprobs(items) if self.shape.logprobs is not None \
                else None
            if self.parser is not None:
                self.parser.flush()
                out["message"] = self.parser.message()
            else:
                out["message"] = {"role": "assistant", "content": "".join(self.text)}
        else:
            out["logprobs"] = self._completion_logprobs(self.items) \
                if self.shape.logprobs is not None else None
            out["text"] = "".join(self.text)
        return out


class _Collector(Choice):
    """A choice that keeps its log-probability items for :meth:`final` instead of streaming."""

    def _logprobs(self, items: list) -> None:
        self.items += items
        return None


async def collect(st: "ServerState", gen: AsyncIterator[tuple[int, Piece]], shape: Shape,
                  n_choices: int, slot: Slot) -> dict:
    choices = [_Collector(st, i, shape) for i in range(n_choices)]
    async for i, piece in gen:
        choices[i].add(piece)
    slot.finish = choices[-1].finish
    return {**shape.head, "object": shape.object, "choices": [c.final() for c in choices],
            "usage": usage(shape.n_prompt, sum(c.tokens for c in choices))}


async def sse(st: "ServerState", gen: AsyncIterator[tuple[int, Piece]], first: tuple[int, Piece],
              shape: Shape, n_choices: int, slot: Slot) -> AsyncIterator[str]:
    obj = shape.object + (".chunk" if shape.chat else "")
    choices = [Choice(st, i, shape) for i in range(n_choices)]
    done = 0

    def chunk(objs: list[dict], extra: dict | None = None) -> str:
        body = {**shape.head, "object": obj, "choices": objs, **(extra or {})}
        return f"data: {json.dumps(body)}\n\n"

    try:
        if shape.chat:
            for c in choices:
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
        item: tuple[int, Piece] | None = first
        while item is not None:
            i, piece = item
            for o in choices[i].add(piece):
                last = n_choices == 1 and o["finish_reason"] is not None
                yield chunk([o], {"usage": usage(shape.n_prompt, piece.tokens)} if last else None)
            done += piece.finish is not None
            slot.finish = piece.finish or slot.finish
            item = None if done == n_choices else await gen.__anext__()
        if shape.include_usage:
            tail = {**shape.head, "object": obj, "choices": [],
                    "usage": usage(shape.n_prompt, sum(c.tokens for c in choices))}
            yield f"data: {json.dumps(tail)}\n\n"
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        await gen.aclose()  # type: ignore[attr-defined]  # a disconnect lands here: cancel
        slot.release()


class EventStream(StreamingResponse):
    """Server-sent events that release the request even when the client leaves before the
    first chunk (an async generator never started runs no ``finally``)."""

    def __init__(self, events: AsyncIterator[str], gen: AsyncIterator, slot: Slot) -> None:
        super().__init__(events, media_type="text/event-stream")
        self._gen, self._slot = gen, slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._gen.aclose()  # type: ignore[attr-defined]
            self._slot.release()
