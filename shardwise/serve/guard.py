"""What stands before the routes: the API key, the body's size and nesting, the server's limits.

:class:`Guard` is one ASGI middleware. For every route but ``/health`` it checks the bearer token
(``Authorization: Bearer KEY``, compared in constant time); for requests with a body it reads the
body up to ``max_body_bytes`` (413 beyond, whatever ``Content-Length`` claims) and refuses JSON
nested deeper than ``max_json_depth`` (400) before anything parses it: Python's ``json.loads``
recurses once per level, so a body 100,000 levels deep would otherwise end in a RecursionError.
Its answers are OpenAI error objects, like every other error of the server.
"""
from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from .protocol import APIError

MiB = 2**20
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)   # a JSON string literal
_BRACKET = re.compile(rb"[\[\]{}]")


@dataclass(frozen=True)
class ServeLimits:
    """The server's own limits (the engine's are in :class:`~.engine.EngineConfig`)."""
    api_key: str | None = None          # bearer token on every route but /health
    max_prompt_tokens: int | None = None  # None: the context - 1
    max_running: int = 32               # requests in the running batch (the engine's max_seqs)
    max_queue: int = 128                # requests that may wait beyond max_running; more: 429
    max_body_bytes: int = 8 * MiB
    max_json_depth: int = 64

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty: give a non-empty --api-key (or unset "
                             "SHARDWISE_API_KEY)")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"--max-prompt-tokens={self.max_prompt_tokens} must be >= 1")
        if self.max_queue < 0:
            raise ValueError(f"--max-queue={self.max_queue} must be >= 0 (0: no waiting)")
        if self.max_running < 1 or self.max_body_bytes < 1 or self.max_json_depth < 1:
            raise ValueError("max_running, max_body_bytes and max_json_depth must be >= 1")

    @property
    def max_in_flight(self) -> int:
        return self.max_running + self.max_queue


def too_deep(body: bytes, limit: int) -> bool:
    """Whether a JSON text nests arrays and objects more than ``limit`` levels deep (``[[1],
    {"a": [2]}]`` has 3 levels); brackets inside strings do not count. Linear in the body;
    malformed JSON is left to the parser to refuse."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # not enough brackets to go deeper: skip the scan
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub(b'""', body)):
        depth += 1 if m.group() in (b"[", b"{") else -1
        if depth > limit:
            return True
    return False


Send = Callable[[dict], Awaitable[None]]


async def _answer(send: Send, e: APIError, headers: list | None = None) -> None:
    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: API key, body size and JSON nesting (see the module docstring)."""

    def __init__(self, app: Any, *, limits: ServeLimits,
                 on_reject: Callable[[int], None] | None = None) -> None:
        self.app, self.limits, self.on_reject = app, limits, on_reject
        key = limits.api_key
        self._expect = None if key is None else f"Bearer {key}".encode()

    async def _reject(self, send: Send, e: APIError, headers: list | None = None) -> None:
        if self.on_reject:
            self.on_reject(e.status)
        await _answer(send, e, headers)

    async def __call__(self, scope: dict, receive: Callable, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._expect is not None and scope["path"] != "/health":
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self._expect):
                what = "no API key was given" if not got else "the API key is not valid"
                return await self._reject(send, APIError(
                    401, f"{what}: send the header 'Authorization: Bearer <key>' with the key "
                    "the server was started with (--api-key)", code="invalid_api_key"),
                    [(b"www-authenticate", b"Bearer")])
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, err = await self._read(scope, receive)
        if err is not None:
            return await self._reject(send, err)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # the disconnect, when the client goes away
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, replay, send)

    async def _read(self, scope: dict, receive: Callable) -> tuple[bytes, APIError | None]:
        cap = self.limits.max_body_bytes
        too_big = APIError(413, f"the request body exceeds {cap} bytes", code="body_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            return b"", too_big
        parts, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return b"", APIError(400, "the client went away before sending the body")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > cap:
                return b"", too_big
            parts.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(parts)
        limit = self.limits.max_json_depth
        if too_deep(body, limit):
            return body, APIError(400, f"the JSON body is nested more than {limit} levels deep",
                                  code="too_deep")
        return body, None
