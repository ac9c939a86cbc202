"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the TP workers.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (JSON or server-sent events,
usage counts included), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).
The server tokenizes, checks each request against the context and the KV cache, hands it to the
engine, detokenizes the tokens that come back and applies stop strings. A client that goes away
mid-stream cancels its request (its KV blocks are freed at once). At most
``max_seqs + max_queue`` requests are in flight; beyond that, 429.
"""
from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .client import EngineClient
from .metrics import Metrics
from .protocol import APIError, ChatRequest, CompletionRequest, check_lengths, parse, stop_list
from .scheduler import SamplerSpec
from .text import TextStream


@dataclass
class ServerState:
    name: str
    engine: EngineClient
    tokenizer: Any
    eos_ids: list[int]
    context: int
    capacity: int                     # KV cache tokens
    max_in_flight: int
    metrics: Metrics = field(default_factory=Metrics)
    in_flight: int = 0
    exit_code: int = 0
    server: Any = None                # the uvicorn.Server, to stop it when a worker dies


@dataclass
class Piece:
    text: str
    logprobs: list[tuple[int, float, list[tuple[int, float]]]]
    finish: str | None
    tokens: int                        # generated so far


async def _generate(st: ServerState, prompt: list[int], req: Any, max_tokens: int,
                    logprobs: int | None) -> AsyncIterator[Piece]:
    """Submit one request and yield its text as it is produced."""
    seed = req.seed if req.seed is not None else random.getrandbits(63)
    temp = 1.0 if req.temperature is None else req.temperature
    spec = SamplerSpec(temperature=temp, top_k=max(0, req.top_k or 0),
                       top_p=1.0 if req.top_p is None else req.top_p, seed=seed,
                       logprobs=logprobs)
    arrived = time.perf_counter()
    sid, q = st.engine.submit(prompt, spec, max_tokens, [] if req.ignore_eos else st.eos_ids)
    st.metrics.inc("prompt_tokens_total", len(prompt))
    text, n, last = TextStream(st.tokenizer, stop_list(req.stop)), 0, None
    try:
        while True:
            item = await q.get()
            if item[0] == "error":
                raise APIError(503, f"the model workers failed: {item[1].splitlines()[0]}",
                               type="service_unavailable", code="worker_died")
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


def _tok(st: ServerState, t: int) -> str:
    return st.tokenizer.decode([t])


def _chat_logprobs(st: ServerState, items: list) -> dict:
    def one(t: int, lp: float) -> dict:
        s = _tok(st, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}
    return {"content": [{**one(t, lp), "top_logprobs": [one(a, b) for a, b in top]}
                        for t, lp, top in items]}


def _completion_logprobs(st: ServerState, items: list, offset: int) -> dict:
    toks = [_tok(st, t) for t, _, _ in items]
    offsets, pos = [], offset
    for s in toks:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": toks, "token_logprobs": [lp for _, lp, _ in items],
            "top_logprobs": [{_tok(st, a): b for a, b in top} for _, _, top in items],
            "text_offset": offsets}


def _prompt_ids(st: ServerState, req: Any) -> list[int]:
    tok = st.tokenizer
    if isinstance(req, ChatRequest):
        if not req.messages:
            raise APIError(400, "messages must contain at least one message", param="messages")
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions")
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return list(tok(text, add_special_tokens=False)["input_ids"])
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], int):
        vocab = len(tok)
        if any(t < 0 or t >= vocab for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(p)
    if isinstance(p, list):
        if len(p) != 1:
            raise APIError(400, f"one prompt per request is supported, got {len(p)}",
                           param="prompt")
        p = p[0]
    return list(tok(p)["input_ids"])


async def _handle(st: ServerState, request: Request, chat: bool) -> Response:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    req = parse(ChatRequest if chat else CompletionRequest, body)
    if req.model != st.name:
        raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                       f"{st.name!r}", param="model", code="model_not_found")
    if st.engine.dead:
        raise APIError(503, "the model workers have died; the server is shutting down",
                       type="service_unavailable", code="worker_died")
    prompt = _prompt_ids(st, req)
    max_tokens = req.max_completion_tokens if chat and req.max_completion_tokens is not None \
        else req.max_tokens
    max_tokens = check_lengths(len(prompt), max_tokens, context=st.context, capacity=st.capacity)
    logprobs = (req.top_logprobs or 0 if req.logprobs else None) if chat else req.logprobs
    if st.in_flight >= st.max_in_flight:
        raise APIError(429, f"the server is at capacity ({st.in_flight} requests in flight); "
                       "retry later", type="rate_limit_error", code="queue_full")
    st.in_flight += 1
    st.metrics.set("requests_in_flight", st.in_flight)
    gen = _generate(st, prompt, req, max_tokens, logprobs)
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = {"id": ident, "created": int(time.time()), "model": st.name}
    try:
        if req.stream:
            first = await gen.__anext__()  # errors before the first token get a status code
            stream = _sse(st, gen, first, head, chat, req, len(prompt), logprobs)
            return StreamingResponse(stream, media_type="text/event-stream")
        return JSONResponse(await _collect(st, gen, head, chat, len(prompt), logprobs))
    except BaseException:
        await gen.aclose()
        _done(st, None)
        raise


def _done(st: ServerState, finish: str | None) -> None:
    st.in_flight -= 1
    st.metrics.set("requests_in_flight", st.in_flight)
    st.metrics.inc("requests_total", label=finish or "cancelled")


def _usage(n_prompt: int, n: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}


async def _collect(st: ServerState, gen: AsyncIterator[Piece], head: dict, chat: bool,
                   n_prompt: int, logprobs: int | None) -> dict:
    text, items, piece = [], [], None
    async for piece in gen:
        text.append(piece.text)
        items += piece.logprobs
    assert piece is not None
    _done(st, piece.finish)
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
            "choices": [choice], "usage": _usage(n_prompt, piece.tokens)}


async def _sse(st: ServerState, gen: AsyncIterator[Piece], first: Piece, head: dict, chat: bool,
               req: Any, n_prompt: int, logprobs: int | None) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    finish, n, offset = None, 0, 0

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
            out["usage"] = _usage(n_prompt, piece.tokens)
        return f"data: {json.dumps(out)}\n\n"

    try:
        if chat:
            yield chunk(Piece("", [], None, 0), {"role": "assistant", "content": ""})
        piece: Piece | None = first
        while piece is not None:
            yield chunk(piece, {"content": piece.text} if piece.text else {})
            finish, n = piece.finish, piece.tokens
            piece = None if finish else await gen.__anext__()
        if req.stream_options is not None and req.stream_options.include_usage:
            yield f"data: {json.dumps({**head, 'object': obj, 'choices': [], 'usage': _usage(n_prompt, n)})}\n\n"
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        await gen.aclose()  # a disconnect lands here: cancel the request, free its blocks
        _done(st, finish)


def create_app(st: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st.engine.attach(asyncio.get_running_loop())
        yield
        await asyncio.to_thread(st.engine.stop)

    app = FastAPI(title="shardwise", lifespan=lifespan)
    st.engine.on_stats = st.metrics.engine_stats
    st.engine.on_dead = lambda reason: _on_dead(st, reason)
    st.metrics.set("kv_blocks_total", st.engine.info.get("num_blocks", 0))
    st.metrics.set("kv_blocks_free", st.engine.info.get("num_blocks", 0))

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        st.metrics.inc("requests_rejected_total", label=str(e.status))
        return JSONResponse(e.body(), status_code=e.status)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _handle(st, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _handle(st, request, chat=False)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": st.name, "object": "model", "created": 0,
                                            "owned_by": "shardwise",
                                            "max_model_len": st.context}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = st.engine.dead is None
        return JSONResponse({"status": "ok" if ok else "dead", "model": st.name,
                             "tp": st.engine.cfg.tp, "workers": st.engine.pids,
                             "reason": st.engine.dead}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(st.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _on_dead(st: ServerState, reason: str) -> None:
    print(f"shardwise serve: {reason}\nshardwise serve: shutting down", file=sys.stderr, flush=True)
    st.exit_code = 1
    if st.server is not None:  # answer 503 a moment, then stop
        asyncio.get_running_loop().call_later(1.0, setattr, st.server, "should_exit", True)
