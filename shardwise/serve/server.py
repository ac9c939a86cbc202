"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the TP workers.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (JSON or server-sent events,
usage counts included), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text);
``/openapi.json`` describes the request bodies (:mod:`.protocol`).

Before a route runs, :class:`.guard.Guard` checks the API key and the body's size and nesting;
then the body is validated against its model (a 400 naming the field otherwise), unsupported
features are refused, the prompt is tokenized (in a thread: a long prompt does not stall the
streams) and checked against the prompt limit, the context and the KV cache, and the request is
handed to the engine (:mod:`.respond`). At most ``max_running + max_queue`` requests are in
flight; beyond that, 429. Every error is an OpenAI error object, a 500 included.
"""
from __future__ import annotations

import asyncio
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .client import EngineClient
from .guard import Guard, ServeLimits
from .metrics import Metrics
from .protocol import (APIError, ChatRequest, CompletionRequest, ErrorBody, check_lengths,
                       message_text, reject_unsupported, validation_error)
from .respond import EventStream, Slot, collect, generate, sse


@dataclass
class ServerState:
    name: str
    engine: EngineClient
    tokenizer: Any
    eos_ids: list[int]
    context: int
    capacity: int                     # KV cache tokens
    vocab: int
    limits: ServeLimits = field(default_factory=ServeLimits)
    metrics: Metrics = field(default_factory=Metrics)
    in_flight: int = 0
    exit_code: int = 0
    server: Any = None                # the uvicorn.Server, to stop it when a worker dies


def _prompt_ids(st: ServerState, req: ChatRequest | CompletionRequest) -> list[int]:
    tok = st.tokenizer
    if isinstance(req, ChatRequest):
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions")
        msgs = [{"role": m.role, "content": message_text(m)} for m in req.messages]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return list(tok(text, add_special_tokens=False)["input_ids"])
    p = req.prompt
    if isinstance(p, list) and isinstance(p[0], list):
        p = p[0]  # one prompt of token ids (several are refused before)
    if isinstance(p, list) and isinstance(p[0], int):
        bad = next((t for t in p if t >= st.vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt token id {bad} is outside the vocabulary: use ids in "
                           f"[0, {st.vocab})", param="prompt", code="invalid_value")
        return list(p)
    if isinstance(p, list):
        p = p[0]
    return list(tok(p)["input_ids"])


def _release(st: ServerState, finish: str | None) -> None:
    st.in_flight -= 1
    st.metrics.set("requests_in_flight", st.in_flight)
    st.metrics.inc("requests_total", label=finish or "cancelled")


async def _handle(st: ServerState, req: ChatRequest | CompletionRequest, chat: bool) -> Response:
    if req.model != st.name:
        raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                       f"{st.name!r}", param="model", code="model_not_found")
    reject_unsupported(req)
    if st.engine.dead:
        raise APIError(503, "the model workers have died; the server is shutting down",
                       type="service_unavailable", code="worker_died")
    lim = st.limits
    if st.in_flight >= lim.max_in_flight:
        raise APIError(429, f"the server is at capacity: {st.in_flight} requests in flight, the "
                       f"limit is {lim.max_running} running + {lim.max_queue} queued "
                       "(--max-seqs, --max-queue); retry later", type="rate_limit_error",
                       code="queue_full")
    st.in_flight += 1
    st.metrics.set("requests_in_flight", st.in_flight)
    slot, gen, handed_off = Slot(lambda finish: _release(st, finish)), None, False
    try:
        prompt = await asyncio.to_thread(_prompt_ids, st, req)
        max_tokens = req.max_completion_tokens if chat and req.max_completion_tokens \
            is not None else req.max_tokens
        max_tokens = check_lengths(len(prompt), max_tokens, context=st.context,
                                   capacity=st.capacity,
                                   max_prompt=lim.max_prompt_tokens or st.context - 1,
                                   prompt_param="messages" if chat else "prompt")
        logprobs = (req.top_logprobs or 0 if req.logprobs else None) if chat else req.logprobs
        gen = generate(st, prompt, req, max_tokens, logprobs)
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
                "created": int(time.time()), "model": st.name}
        if req.stream:
            first = await gen.__anext__()  # errors before the first token get a status code
            events = sse(st, gen, first, head, chat, req, len(prompt), logprobs, slot)
            handed_off = True
            return EventStream(events, gen, slot)
        return JSONResponse(await collect(st, gen, head, chat, len(prompt), logprobs, slot))
    finally:
        if not handed_off:
            if gen is not None:
                await gen.aclose()
            slot.release()


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what} for code, what in (
        (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
        (413, "body too large"), (429, "too many requests in flight"),
        (500, "the engine failed on this request"), (503, "the model workers died"))}


def create_app(st: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st.engine.attach(asyncio.get_running_loop())
        yield
        await asyncio.to_thread(st.engine.stop)

    app = FastAPI(title="shardwise", lifespan=lifespan,
                  description="OpenAI-compatible tensor-parallel server")
    app.add_middleware(Guard, limits=st.limits,
                       on_reject=lambda s: st.metrics.inc("requests_rejected_total", label=str(s)))
    st.engine.on_stats = st.metrics.engine_stats
    st.engine.on_dead = lambda reason: _on_dead(st, reason)
    st.metrics.set("kv_blocks_total", st.engine.info.get("num_blocks", 0))
    st.metrics.set("kv_blocks_free", st.engine.info.get("num_blocks", 0))

    def answer(e: APIError) -> JSONResponse:
        st.metrics.inc("requests_rejected_total", label=str(e.status))
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return answer(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return answer(validation_error(e.errors(), ChatRequest if
                                       request.url.path.endswith("chat/completions")
                                       else CompletionRequest))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return answer(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                               code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        return answer(APIError(500, f"internal error: {type(e).__name__}: {e}",
                               type="server_error", code="internal_error"))

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat(body: ChatRequest) -> Response:
        return await _handle(st, body, chat=True)

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(body: CompletionRequest) -> Response:
        return await _handle(st, body, chat=False)

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
