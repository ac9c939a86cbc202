"""OpenAI-compatible request bodies: typed, range-checked, and the features not implemented yet.

The request models are declared on the routes, so the server's OpenAPI schema (``/openapi.json``)
describes them. Validation is strict: a string where a number belongs is an error, not coerced;
integers stay within int64 (a seed of 2**80 is a 400, not a dead worker); floats are finite;
unknown fields are a 400 naming the field, as OpenAI's API answers ("Unrecognized request
argument"). Every problem becomes :class:`APIError`, rendered as
``{"error": {"message", "type", "param", "code"}}``.

Fields that OpenAI defines but shardwise does not implement (penalties, ``logit_bias``,
``best_of``, ``suffix``, non-text message parts) exist here with their real OpenAI types; each has
one explicit rejection in :func:`reject_unsupported`, so implementing a feature removes one line.
:func:`check_tools` checks what the types cannot say about ``tools`` and ``tool_choice``.
"""
from __future__ import annotations

import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Count = Annotated[int, Field(ge=1, le=INT64_MAX)]          # a positive count (tokens, choices)
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]        # checked against the vocabulary later
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False,
                              populate_by_name=True)


class ErrorDetail(_Strict):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(_Strict):
    """What every 4xx/5xx answer carries (the OpenAI error object)."""
    error: ErrorDetail


# ---------------------------------------------------------------------------- tools and formats
class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None      # a JSON schema
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ResponseFormatText(_Strict):
    type: Literal["text"]


class ResponseFormatJSONObject(_Strict):
    type: Literal["json_object"]


class JSONSchemaFormat(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatJSONSchema(_Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[Union[ResponseFormatText, ResponseFormatJSONObject,
                                 ResponseFormatJSONSchema], Field(discriminator="type")]


class StreamOptions(_Strict):
    include_usage: bool = False


# ---------------------------------------------------------------------------- messages
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Strict):
    data: str
    format: Literal["wav", "mp3"]


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileRef(_Strict):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class FilePart(_Strict):
    type: Literal["file"]
    file: FileRef


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


UserPart = Annotated[Union[TextPart, ImagePart, AudioPart, FilePart], Field(discriminator="type")]
AssistantPart = Annotated[Union[TextPart, RefusalPart], Field(discriminator="type")]


class FunctionCall(_Strict):
    name: str
    arguments: str                                  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class SystemMessage(_Strict):
    role: Literal["system"]
    content: str | list[TextPart]
    name: str | None = None


class DeveloperMessage(_Strict):
    role: Literal["developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


Message = Annotated[Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage,
                          ToolMessage], Field(discriminator="role")]


def message_text(m: Any) -> str:
    """The text of a message (only text parts reach here: others are rejected first)."""
    if isinstance(m.content, list):
        return "".join(p.text for p in m.content if isinstance(p, TextPart))
    return m.content or ""


# ---------------------------------------------------------------------------- requests
class _Common(_Strict):
    model: str
    max_tokens: Count | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)   # extension (vLLM's): -1 or 0 = off
    seed: Int64 | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[int, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    ignore_eos: bool = False                               # extension: run to max_tokens


class ChatRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


Prompt = Union[str, Annotated[list[str], Field(min_length=1)],
               Annotated[list[TokenId], Field(min_length=1)],
               Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]]


class CompletionRequest(_Common):
    prompt: Prompt
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1, le=20)] | None = None
    suffix: str | None = None


def _unsupported(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="unsupported_parameter")


def reject_unsupported(req: ChatRequest | CompletionRequest) -> None:
    """A 400 naming the field for every OpenAI feature not implemented yet; one check each."""
    checks: list[tuple[bool, str, str]] = [
        (bool(req.presence_penalty), "presence_penalty", "penalties are not supported (use 0)"),
        (bool(req.frequency_penalty), "frequency_penalty", "penalties are not supported (use 0)"),
        (bool(req.logit_bias), "logit_bias", "logit_bias is not supported"),
    ]
    if isinstance(req, ChatRequest):
        for i, m in enumerate(req.messages):
            if isinstance(m.content, list):
                checks += [(p.type not in ("text", "refusal"), f"messages[{i}].content[{j}]",
                            f"{p.type} parts are not supported: this model reads text only")
                           for j, p in enumerate(m.content)]
    else:
        checks += [
            (req.best_of is not None and req.best_of > 1, "best_of",
             f"best_of={req.best_of}: use n={req.best_of} and choose among the choices"),
            (req.suffix is not None, "suffix", "suffix (insertion) is not supported"),
        ]
    for bad, param, message in checks:
        if bad:
            raise _unsupported(param, message)


def check_tools(req: ChatRequest) -> None:
    """``tool_choice`` needs ``tools`` and must name one of them; tool names are unique."""
    names = [t.function.name for t in req.tools or []]
    choice = req.tool_choice
    if choice not in (None, "none") and not names:
        raise APIError(400, "tool_choice: give tools to choose from", param="tool_choice")
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise APIError(400, f"tools: the function name {dup!r} is given twice", param="tools")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise APIError(400, f"tool_choice: the function {choice.function.name!r} is not among "
                       f"the tools ({', '.join(names)})", param="tool_choice")


def _models_in(tp: Any) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for a in typing.get_args(tp) for m in _models_in(a)]


def field_path(model: type[BaseModel], loc: tuple) -> str:
    """``messages[0].content[1].text`` from pydantic's error location, without the union
    members and discriminator tags it also lists."""
    cands, out = [model], ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
            continue
        fields = {f.alias or k: f for c in cands for k, f in c.model_fields.items()}
        if x in fields:
            out += f".{x}"
            cands = _models_in(fields[x].annotation)
    return out.lstrip(".")


def validation_error(errors: list[dict], model: type[BaseModel]) -> APIError:
    """The first problem of a body that does not fit ``model``, as an OpenAI 400."""
    err = max(errors, key=lambda e: len(e["loc"]))  # the most specific of a union's members
    loc = tuple(err["loc"][1:])  # drop "body"
    path = field_path(model, loc)
    if err["type"] == "json_invalid":
        why = (err.get("ctx") or {}).get("error") or err.get("msg")
        return APIError(400, f"the request body is not valid JSON: {why}", code="invalid_json")
    if err["type"] == "extra_forbidden":
        path = (path + "." if path else "") + str(loc[-1])
        return APIError(400, f"unrecognized request argument supplied: {path}", param=path,
                        code="unknown_parameter")
    if err["type"] == "missing" and not path:
        return APIError(400, "the request body is missing: send a JSON object")
    got = repr(err.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return APIError(400, f"{path or 'the request body'}: {err['msg']} (got {got})",
                    param=path or None,
                    code="invalid_type" if "type" in err["type"] else "invalid_value")


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [s for s in ([stop] if isinstance(stop, str) else stop) if s]


def check_lengths(n_prompt: int, max_tokens: int | None, *, context: int, capacity: int,
                  max_prompt: int, prompt_param: str = "messages") -> int:
    """The number of tokens to generate; raises when the prompt or max_tokens do not fit."""
    if n_prompt == 0:
        raise APIError(400, "the prompt is empty", param=prompt_param)
    if n_prompt > max_prompt:
        raise APIError(400, f"the prompt has {n_prompt} tokens but this server accepts at most "
                       f"{max_prompt} (--max-prompt-tokens)", param=prompt_param,
                       code="context_length_exceeded")
    if n_prompt >= context:
        raise APIError(400, f"the prompt has {n_prompt} tokens but the model's context is "
                       f"{context} tokens", param=prompt_param, code="context_length_exceeded")
    room = context - n_prompt
    if max_tokens is None:
        max_tokens = min(room, capacity - n_prompt)
    if max_tokens > room:
        raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {n_prompt} tokens exceed "
                       f"the context of {context} tokens: use max_tokens <= {room}",
                       param="max_tokens", code="context_length_exceeded")
    if n_prompt + max_tokens > capacity:
        raise APIError(400, f"{n_prompt} prompt + {max_tokens} new tokens exceed the KV cache of "
                       f"{capacity} tokens: use max_tokens <= {max(0, capacity - n_prompt)}",
                       param="max_tokens", code="context_length_exceeded")
    if max_tokens < 1:
        raise APIError(400, f"the prompt's {n_prompt} tokens fill the KV cache of {capacity} "
                       "tokens", param=prompt_param, code="context_length_exceeded")
    return max_tokens
