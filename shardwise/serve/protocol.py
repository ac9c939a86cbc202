"""OpenAI-compatible request bodies, their checks, and OpenAI-style error responses.

Fields are validated strictly (a string where a number belongs is an error, not coerced). Every
problem becomes :class:`APIError`, rendered as ``{"error": {"message", "type", "param", "code"}}``
with a 4xx status, as the OpenAI API does. Unknown fields are ignored, like OpenAI's.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)          # extension (vLLM's): -1 or 0 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False                        # extension: run to max_tokens


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


def parse(cls: type[BaseModel], body: Any) -> Any:
    """Validate ``body`` as ``cls`` or raise a 400 :class:`APIError` naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        raise APIError(400, f"{param}: {err['msg']} (got {err.get('input')!r})"
                       if param else err["msg"], param=param,
                       code="invalid_type" if "type" in err["type"] else "invalid_value") from None


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4:
        raise APIError(400, f"at most 4 stop sequences are allowed, got {len(stops)}",
                       param="stop")
    return [s for s in stops if s]


def check_lengths(n_prompt: int, max_tokens: int | None, *, context: int,
                  capacity: int) -> int:
    """The number of tokens to generate; raises when the prompt or max_tokens do not fit."""
    if n_prompt == 0:
        raise APIError(400, "the prompt is empty", param="prompt")
    if n_prompt >= context:
        raise APIError(400, f"the prompt has {n_prompt} tokens but the model's context is "
                       f"{context} tokens", param="messages", code="context_length_exceeded")
    room = context - n_prompt
    if max_tokens is None:
        max_tokens = room
    if max_tokens <= 0:
        raise APIError(400, f"max_tokens={max_tokens} must be at least 1", param="max_tokens")
    if max_tokens > room:
        raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {n_prompt} tokens exceed "
                       f"the context of {context} tokens: use max_tokens <= {room}",
                       param="max_tokens", code="context_length_exceeded")
    if n_prompt + max_tokens > capacity:
        raise APIError(400, f"{n_prompt} prompt + {max_tokens} new tokens exceed the KV cache of "
                       f"{capacity} tokens", param="max_tokens")
    return max_tokens
