"""One request's life after it is accepted: submit its sequences, detokenize, hand on the text.

A request has one or more *choices*: ``n`` samples of each of its prompts (several prompts in
``/v1/completions``). :func:`submit` gives the engine one submission per prompt, whose ``n``
samples share one prefill; :func:`pieces` yields one choice's :class:`Piece` s of text as its
tokens come back (stop strings applied); :func:`merged` interleaves the choices. The request's
slot among the in-flight requests is released exactly once (:class:`Slot`), whether it finished,
failed, or its client went away at any moment: a cancelled choice's KV blocks are freed at once.
:mod:`.answer` turns the pieces into OpenAI's JSON and server-sent events.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from .client import EngineDead
from .protocol import INT64_MIN, APIError, stop_list
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
    prompt: list | None = None         # the prompt's log-probability entries (first piece only)


class Slot:
    """A request's place among the in-flight requests; :meth:`release` counts once."""

    def __init__(self, on_release: Callable[[str | None], None]) -> None:
        self._on_release, self.finish, self.released = on_release, None, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._on_release(self.finish)


def sampler_specs(req: Any, n: int, logprobs: int | None,
                  prompt_logprobs: int | None) -> list[SamplerSpec]:
    """The samplers of ``n`` samples: sample ``j`` draws with ``seed + j`` (wrapped to int64)."""
    seed = req.seed if req.seed is not None else random.getrandbits(63)
    return [SamplerSpec(temperature=1.0 if req.temperature is None else req.temperature,
                        top_k=max(0, req.top_k or 0),
                        top_p=1.0 if req.top_p is None else req.top_p,
                        seed=(seed + j - INT64_MIN) % 2**64 + INT64_MIN, logprobs=logprobs,
                        prompt_logprobs=prompt_logprobs) for j in range(n)]


def submit(st: "ServerState", prompts: list[list[int]], req: Any, max_tokens: list[int], *,
           n: int, logprobs: int | None, prompt_logprobs: int | None,
           grammar: str | None) -> list[tuple[int, asyncio.Queue]]:
    """Submit every prompt with its ``n`` samples; returns the choices' (sequence id, queue), in
    choice order (prompt-major)."""
    specs = sampler_specs(req, n, logprobs, prompt_logprobs)
    out: list[tuple[int, asyncio.Queue]] = []
    try:
        for p, m in zip(prompts, max_tokens):
            out += st.engine.submit(p, specs, m, [] if req.ignore_eos else st.eos_ids,
                                    grammar=grammar)
    except EngineDead as e:  # died between the check and the submission
        for sid, _ in out:
            st.engine.cancel(sid)
        raise APIError(503, f"the model workers failed: {str(e).splitlines()[0]}",
                       type="service_unavailable", code="worker_died") from None
    st.metrics.inc("prompt_tokens_total", sum(len(p) for p in prompts))
    return out


async def pieces(st: "ServerState", sid: int, q: asyncio.Queue, req: Any) -> AsyncIterator[Piece]:
    """One choice's text as it is produced."""
    arrived = time.perf_counter()
    text, n, last, prompt = TextStream(st.tokenizer, stop_list(req.stop)), 0, None, None
    try:
        while True:
            item = await q.get()
            if item[0] == "error":
                _, why, status, code = item
                kind = "invalid_request_error" if status < 500 else \
                    "service_unavailable" if status == 503 else "server_error"
                raise APIError(status, f"the model workers failed: {why.splitlines()[0]}"
                               if code == "worker_died" else why, type=kind, code=code)
            if item[0] == "prompt":
                prompt = (prompt or []) + item[1]
                continue
            _, tok, reason, lp, at = item
            if last is None:
                st.metrics.ttft.observe(at - arrived)
            else:
                st.metrics.itl.observe(at - last)
            last = at
            if reason == "stop" and not req.ignore_eos and tok in st.eos_ids:  # end of sequence
                yield Piece(text.flush(), [], "stop", n, prompt)
                break
            n += 1
            st.metrics.inc("generation_tokens_total")
            delta, stopped = text.add(tok)
            lps = [(tok, lp[0], lp[1])] if lp is not None else []
            if stopped or reason is not None:
                yield Piece(delta + text.flush(), lps, "stop" if stopped else reason, n, prompt)
                break
            if delta or lps or prompt:
                yield Piece(delta, lps, None, n, prompt)
                prompt = None
    finally:
        st.engine.cancel(sid)  # no-op when the engine already finished it


async def merged(gens: list[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
    """``(choice index, piece)`` from several choices as they come; the first error ends all."""
    if len(gens) == 1:
        try:
            async for p in gens[0]:
                yield 0, p
        finally:
            await gens[0].aclose()  # type: ignore[attr-defined]
        return
    box: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, g: AsyncIterator[Piece]) -> None:
        try:
            async for p in g:
                await box.put((i, p, None))
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            await box.put((i, None, e))
        finally:
            await box.put((i, None, None))
    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    open_ = len(gens)
    try:
        while open_:
            i, p, err = await box.get()
            if err is not None:
                raise err
            if p is None:
                open_ -= 1
                continue
            yield i, p
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gens:
            await g.aclose()  # type: ignore[attr-defined]
