"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the TP workers.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (JSON or server-sent events,
usage counts included), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text);
``/openapi.json`` describes the request bodies (:mod:`.protocol`).

Before a route runs, :class:`.guard.Guard` checks the API key and the body's size and nesting;
then the body is validated against its model (a 400 naming the field otherwise), unsupported
features are refused, the prompts are tokenized and the grammar of a structured answer is compiled
(in a thread: a long prompt does not stall the streams), each prompt is checked against the prompt
limit, the context and the KV cache, and the request's choices (``n`` samples of each prompt) are
handed to the engine (:mod:`.respond`) and answered (:mod:`.answer`). At most
``max_running + max_queue`` requests are in flight; beyond that, 429. Every error is an OpenAI
error object, a 500 included.
"""
from __future__ import annotations

import asyncio
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .client import EngineClient
from .guard import Guard, ServeLimits
from .metrics import Metrics
from .answer import EventStream, Shape, collect, sse
from .grammar import GrammarError, json_grammar, lark_json
from .protocol import (APIError, ChatRequest, CompletionRequest, ErrorBody, check_lengths,
                       check_tools, message_text, reject_unsupported, validation_error)
from .respond import Slot, merged, pieces, submit
from .tools import chat_messages, tool_grammar


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


MAX_CHOICES = 128  # n x prompts of one request


@dataclass
class Prepared:
    """A request made ready for the engine: its prompts and what shapes its answer."""
    prompts: list[list[int]]
    echo: list[str] | None = None     # the prompts' text, when echoed
    grammar: str | None = None


def _chat_prompt(st: ServerState, req: ChatRequest) -> list[int]:
    tok = st.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "this model has no chat template: use /v1/completions")
    msgs, extra = chat_messages(req, tok, message_text)
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **extra)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _chat_grammar(req: ChatRequest) -> str | None:
    """The grammar of the answer: the response format, tool calls, or both; 400 when it does not
    compile."""
    rf, param = req.response_format, "response_format"
    try:
        answer = None
        if rf is not None and rf.type == "json_object":
            answer = json_grammar(None)
        elif rf is not None and rf.type == "json_schema":
            answer = json_grammar(rf.json_schema.schema_, strict=bool(rf.json_schema.strict))
        if req.tools and req.tool_choice != "none":
            param = "tools"
            item = None if answer is None else lark_json(
                rf.json_schema.schema_ if rf.type == "json_schema" else None,
                strict=rf.type != "json_schema" or bool(rf.json_schema.strict))
            return tool_grammar(req, item)
        return answer
    except (GrammarError, TypeError, ValueError) as e:
        raise APIError(400, f"{param}: the schema cannot be used for structured output: {e}",
                       param=param, code="invalid_schema") from None


def _completion_prompts(st: ServerState, req: CompletionRequest) -> Prepared:
    p = req.prompt
    batch = [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)
    prompts: list[list[int]] = []
    for i, one in enumerate(batch):
        if isinstance(one, str):
            prompts.append(list(st.tokenizer(one)["input_ids"]))
            continue
        bad = next((t for t in one if t >= st.vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt token id {bad} is outside the vocabulary: use ids in "
                           f"[0, {st.vocab})", param="prompt" if len(batch) == 1
                           else f"prompt[{i}]", code="invalid_value")
        prompts.append(list(one))
    echo = None
    if req.echo:  # the text of a prompt given as text, else its decoded tokens
        echo = [one if isinstance(one, str) else st.tokenizer.decode(ids)
                for one, ids in zip(batch, prompts)]
    return Prepared(prompts, echo)


def _prepare(st: ServerState, req: ChatRequest | CompletionRequest) -> Prepared:
    """Tokenize (and compile the grammar): CPU work, run in a thread."""
    if isinstance(req, ChatRequest):
        check_tools(req)
        return Prepared([_chat_prompt(st, req)], grammar=_chat_grammar(req))
    return _completion_prompts(st, req)


def _release(st: ServerState, finish: str | None) -> None:
    st.in_flight -= 1
    st.metrics.set("requests_in_flight", st.in_flight)
    st.metrics.inc("requests_total", label=finish or "cancelled")


def _take_slot(st: ServerState, req: ChatRequest | CompletionRequest) -> Slot:
    """The request's place among those in flight, or the error that refuses it."""
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
    return Slot(lambda finish: _release(st, finish))


def _start(st: ServerState, req: ChatRequest | CompletionRequest, prep: Prepared,
           chat: bool) -> tuple[AsyncIterator, Shape, list[int]]:
    """Check the lengths, submit every choice; returns the merged pieces, the answer's shape and
    the choices' sequence ids."""
    n_choices = req.n * len(prep.prompts)
    if n_choices > MAX_CHOICES:
        raise APIError(400, f"n={req.n} x {len(prep.prompts)} prompts = {n_choices} choices; "
                       f"one request may ask for at most {MAX_CHOICES}", param="n")
    limit = req.max_completion_tokens if chat and req.max_completion_tokens is not None \
        else req.max_tokens
    max_tokens = [check_lengths(len(p), limit, context=st.context, capacity=st.capacity,
                                max_prompt=st.limits.max_prompt_tokens or st.context - 1,
                                prompt_param="messages" if chat else "prompt")
                  for p in prep.prompts]
    logprobs = (req.top_logprobs or 0 if req.logprobs else None) if chat else req.logprobs
    seqs = submit(st, prep.prompts, req, max_tokens, n=req.n, logprobs=logprobs,
                  prompt_logprobs=logprobs if prep.echo else None, grammar=prep.grammar)
    echo = None if prep.echo is None else [(prep.echo[i // req.n], prep.prompts[i // req.n])
                                           for i in range(n_choices)]
    head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            "created": int(time.time()), "model": st.name}
    shape = Shape(chat=chat, head=head, n_prompt=sum(len(p) for p in prep.prompts),
                  logprobs=logprobs, tools=chat and bool(req.tools) and req.tool_choice != "none",
                  echo=echo, include_usage=req.stream_options is not None and
                  req.stream_options.include_usage)
    return merged([pieces(st, sid, q, req) for sid, q in seqs]), shape, [sid for sid, _ in seqs]


async def _handle(st: ServerState, req: ChatRequest | CompletionRequest, chat: bool) -> Response:
    slot, gen, handed_off, sids = _take_slot(st, req), None, False, []
    try:
        prep = await asyncio.to_thread(_prepare, st, req)
        gen, shape, sids = _start(st, req, prep, chat)
        n_choices = len(sids)
        if req.stream:
            first = await gen.__anext__()  # errors before the first token get a status code
            events = sse(st, gen, first, shape, n_choices, slot)
            handed_off = True
            return EventStream(events, gen, slot)
        return JSONResponse(await collect(st, gen, shape, n_choices, slot))
    finally:
        if not handed_off:
            if gen is not None:
                await gen.aclose()
            for sid in sids:  # choices never started have no generator to cancel them
                st.engine.cancel(sid)
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
