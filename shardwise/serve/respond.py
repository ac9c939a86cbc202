"""One request's life after it is accepted: submit to the engine, detokenize, answer.

:func:`generate` submits and yields :class:`Piece` s of text as tokens come back (stop strings
applied); :func:`collect` builds the JSON answer, :func:`sse` the server-sent events. The request's
slot among the in-flight requests is released exactly once (:class:`Slot`), whether it finished,
failed, or its client went away at any moment: a cancelled request's KV blocks are freed at once.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from starlette.responses import StreamingResponse

from .client import EngineDead
from .protocol import APIError, stop_list
from .scheduler import SamplerSpec
from .text import TextStream

if TYPE_CHECKING:
    from .server import ServerState


@dataclass
class Piece:
    text: str
    logprobs: list[tuple[int, float, list[tuple[int, float]]]]
    finish: str | None
    tokens: int                        # generated so far


class Slot:
    """A request's place among the in-flight requests; :meth:`release` counts once."""

    def __init__(self, on_release: Callable[[str | None], None]) -> None:
        self._on_release, self.finish, self.released = on_release, None, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._on_release(self.finish)


def sampler_spec(req: Any, logprobs: int | None) -> SamplerSpec:
    seed = req.seed if req.seed is not None else random.getrandbits(63)
    return SamplerSpec(temperature=1.0 if req.temperature is None else req.temperature,
                       top_k=max(0, req.top_k or 0), top_p=1.0 if req.top_p is None else req.top_p,
                       seed=seed, logprobs=logprobs)


async def generate(st: "ServerState", prompt: list[int], req: Any, max_tokens: int,
                   logprobs: int | None) -> AsyncIterator[Piece]:
    """Submit one request and yield its text as it is produced."""
    arrived = time.perf_counter()
    try:
        sid, q = st.engine.submit(prompt, sampler_spec(req, logprobs), max_tokens,
                                  [] if req.ignore_eos else st.eos_ids)
    except EngineDead as e:  # died between the check and the submission
        raise APIError(503, f"the model workers failed: {str(e).splitlines()[0]}",
                       type="service_unavailable", code="worker_died") from None
    st.metrics.inc("prompt_tokens_total", len(prompt))
    text, n, last = TextStream(st.tokenizer, stop_list(req.stop)), 0, None
    try:
        while True:
            item = await q.get()
            if item[0] == "error":
                _, why, status, code = item
                kind = "invalid_request_error" if status < 500 else \
                    "service_unavailable" if status == 503 else "server_error"
                raise APIError(status, f"the model workers failed: {why.splitlines()[0]}"
                               if code == "worker_died" else why, type=kind, code=code)
            _, tok, reason, lp, at = item
            if last is None:
                st.metrics.ttft.observe(at - arrived)
            else:
                st.metrics.itl.observe(at - last)
            last = at
            if reason == "stop":  # end of sequence token
                yield Piece(text.flush(), [], "stop", n)
                break
            n += 1
            st.metrics.inc("generation_tokens_total")
            delta, stopped = text.add(tok)
            lps = [(tok, lp[0], lp[1])] if lp is not None else []
            if stopped or reason == "length":
                yield Piece(delta + text.flush(), lps, "stop" if stopped else "length", n)
                break
            if delta or lps:
                yield Piece(delta, lps, None, n)
    finally:
        st.engine.cancel(sid)  # no-op when the engine already finished it


def _tok(st: "ServerState", t: int) -> str:
    return st.tokenizer.decode([t])


def _chat_logprobs(st: "ServerState", items: list) -> dict:
    def one(t: int, lp: float) -> dict:
        s = _tok(st, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}
    return {"content": [{**one(t, lp), "top_logprobs": [one(a, b) for a, b in top]}
                        for t, lp, top in items]}


def _completion_logprobs(st: "ServerState", items: list, offset: int) -> dict:
    toks = [_tok(st, t) for t, _, _ in items]
    offsets, pos = [], offset
    for s in toks:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": toks, "token_logprobs": [lp for _, lp, _ in items],
            "top_logprobs": [{_tok(st, a): b for a, b in top} for _, _, top in items],
            "text_offset": offsets}


def usage(n_prompt: int, n: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}


async def collect(st: "ServerState", gen: AsyncIterator[Piece], head: dict, chat: bool,
                  n_prompt: int, logprobs: int | None, slot: Slot) -> dict:
    text, items, piece = [], [], None
    async for piece in gen:
        text.append(piece.text)
        items += piece.logprobs
    assert piece is not None
    slot.finish = piece.finish
    out = "".join(text)
    lp = None
    if logprobs is not None:
        lp = _chat_logprobs(st, items) if chat else _completion_logprobs(st, items, 0)
    choice: dict[str, Any] = {"index": 0, "logprobs": lp, "finish_reason": piece.finish}
    if chat:
        choice["message"] = {"role": "assistant", "content": out}
    else:
        choice["text"] = out
    return {**head, "object": "chat.completion" if chat else "text_completion",
            "choices": [choice], "usage": usage(n_prompt, piece.tokens)}


async def sse(st: "ServerState", gen: AsyncIterator[Piece], first: Piece, head: dict, chat: bool,
              req: Any, n_prompt: int, logprobs: int | None, slot: Slot) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    n, offset = 0, 0

    def chunk(piece: Piece, delta: dict) -> str:
        nonlocal offset
        lp = None
        if logprobs is not None and piece.logprobs:
            lp = _chat_logprobs(st, piece.logprobs) if chat else \
                _completion_logprobs(st, piece.logprobs, offset)
        offset += len(piece.text)
        c: dict[str, Any] = {"index": 0, "logprobs": lp, "finish_reason": piece.finish}
        c.update({"delta": delta} if chat else {"text": piece.text})
        out = {**head, "object": obj, "choices": [c]}
        if piece.finish:
            out["usage"] = usage(n_prompt, piece.tokens)
        return f"data: {json.dumps(out)}\n\n"

    try:
        if chat:
            yield chunk(Piece("", [], None, 0), {"role": "assistant", "content": ""})
        piece: Piece | None = first
        while piece is not None:
            yield chunk(piece, {"content": piece.text} if piece.text else {})
            slot.finish, n = piece.finish, piece.tokens
            piece = None if slot.finish else await gen.__anext__()
        if req.stream_options is not None and req.stream_options.include_usage:
            tail = {**head, "object": obj, "choices": [], "usage": usage(n_prompt, n)}
            yield f"data: {json.dumps(tail)}\n\n"
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        await gen.aclose()  # a disconnect lands here: cancel the request, free its blocks
        slot.release()


class EventStream(StreamingResponse):
    """Server-sent events that release the request even when the client leaves before the
    first chunk (an async generator never started runs no ``finally``)."""

    def __init__(self, events: AsyncIterator[str], gen: AsyncIterator[Piece], slot: Slot) -> None:
        super().__init__(events, media_type="text/event-stream")
        self._gen, self._slot = gen, slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._gen.aclose()  # type: ignore[attr-defined]
            self._slot.release()
