"""The OpenAI request bodies `jaxpar serve` takes, as typed models: every field's type, range and
size is declared once here and checked by pydantic for both endpoints, so that no field reaches
the engine unchecked.

The rules are the project's (`jaxpar.errors.typed`): an integer may stand for a number, a boolean
is never a number, nothing is parsed from a string, and no number is NaN or infinite. Fields
jaxpar does not know are ignored, as the OpenAI API does. The body is parsed by pydantic's JSON
parser, which refuses invalid UTF-8 and nesting deeper than a few hundred levels. Free text (a
prompt, a message's content) is bounded by the body's size (`serve.max_body_bytes`), every other
string and every list by a constant below.

A refused body gets an `ApiError` whose message names the field, what it must be and what it was:
`'temperature' must be a number in [0, 2], got NaN`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import from_json
from starlette.responses import JSONResponse

MAX_STOPS = 4  # strings in `stop`
MAX_STOP_CHARS = 512  # characters in each
MAX_STOP_IDS = 64  # ids in `stop_token_ids`
MAX_MESSAGES = 4096  # messages of a chat, and text parts of a message
MAX_NAME_CHARS = 256  # `model`, `user`
INT64 = (-(1 << 63), (1 << 63) - 1)


class ApiError(Exception):
    """An answer with an OpenAI error object, `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status, message, param, kind, code,
        )  # fmt: skip
        self.headers = headers

    def body(self) -> dict:
        error = {"message": self.message, "type": self.kind, "param": self.param,
                 "code": self.code}  # fmt: skip
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# -- field declarations: each constraint and its description from one call ------------------


def _number(low: float, high: float, low_open: bool = False, note: str = "") -> Any:
    bound = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
    what = f"{low:g}" if low == high else f"a number in {bound}"
    return Field(None, gt=low if low_open else None, ge=None if low_open else low, le=high,
                 allow_inf_nan=False, description=what + note)  # fmt: skip


def _integer(low: int, high: int = INT64[1], note: str = "") -> Any:
    what = (f"{low}" if low == high else "a 64-bit integer" if (low, high) == INT64
            else f"an integer of at least {low}" if high == INT64[1]
            else f"an integer in [{low}, {high}]")  # fmt: skip
    return Field(None, ge=low, le=high, description=what + note)


def _text(chars: int) -> Any:
    return Field(None, max_length=chars, description=f"a string of at most {chars} characters")


def _flag(unsupported: str = "") -> Any:
    """A boolean; with `unsupported` (why), only false."""
    what = f"false ({unsupported})" if unsupported else "true or false"
    return Field(None, description=what)


_Id = Annotated[int, Field(ge=0, le=INT64[1])]
_Stop = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class StreamOptions(_Body):
    include_usage: bool | None = _flag()


class TextPart(_Body):
    type: Literal["text"] = Field(description='"text" (the only kind of content part)')
    text: str = Field(description="a string")


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description='one of "system", "developer", "user", "assistant" or "tool"'
    )
    content: str | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)] | None = Field(
        None, description=f'a string or an array of at most {MAX_MESSAGES} text parts '
        '({"type": "text", "text": ...})'
    )  # fmt: skip

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class GenerationRequest(_Body):
    """The fields both endpoints share: the model, sampling, stops and streaming."""

    model: str | None = _text(MAX_NAME_CHARS)
    max_tokens: int | None = _integer(1)
    temperature: float | None = _number(0, 2)
    top_p: float | None = _number(0, 1, low_open=True)
    top_k: int | None = _integer(-1, note=" (-1 or 0: no limit)")
    n: int | None = _integer(1, 1, note=" (jaxpar returns one choice a request)")
    seed: int | None = _integer(*INT64)
    stop: _Stop | Annotated[list[_Stop], Field(max_length=MAX_STOPS)] | None = Field(
        None, description=f"a string or an array of at most {MAX_STOPS} strings, each of at "
        f"most {MAX_STOP_CHARS} characters"
    )  # fmt: skip
    stop_token_ids: Annotated[list[_Id], Field(max_length=MAX_STOP_IDS)] | None = Field(
        None, description=f"an array of at most {MAX_STOP_IDS} token ids"
    )
    ignore_eos: bool | None = _flag()
    # jaxpar's: false keeps this request out of speculative decoding (`serve.speculative`)
    speculative: bool | None = _flag()
    presence_penalty: float | None = _number(0, 0, note=" (penalties are not supported)")
    frequency_penalty: float | None = _number(0, 0, note=" (penalties are not supported)")
    top_logprobs: int | None = _integer(0, 0, note=" (log probabilities are not supported)")
    stream: bool | None = _flag()
    stream_options: StreamOptions | None = Field(None, description='an object such as '
                                                 '{"include_usage": true}')  # fmt: skip
    user: str | None = _text(MAX_NAME_CHARS)

    @property
    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stop if s)


class CompletionRequest(GenerationRequest):
    """`POST /v1/completions`."""

    prompt: str | list[_Id] | Annotated[list[str | list[_Id]], Field(max_length=1)] = Field(
        description="a string or an array of token ids (one prompt a request)"
    )
    echo: Literal[False] | None = _flag("echo is not supported")
    best_of: int | None = _integer(1, 1, note=" (jaxpar returns one choice a request)")
    logprobs: int | None = _integer(0, 0, note=" (log probabilities are not supported)")

    @property
    def one_prompt(self) -> str | list[int]:
        """The prompt, unwrapped from a batch of one."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            return prompt[0]
        return prompt


class ChatRequest(GenerationRequest):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)] = Field(
        description=f"a non-empty array of at most {MAX_MESSAGES} messages"
    )
    max_completion_tokens: int | None = _integer(1)
    logprobs: Literal[False] | None = _flag("log probabilities are not supported")


T = TypeVar("T", bound=_Body)


def parse(kind: type[T], body: bytes) -> T:
    """`body` as a request of type `kind`.

    Raises:
        ApiError: 400, naming the first field that is missing or invalid (or the JSON's fault).
    """
    try:
        doc = from_json(body)
    except ValueError as e:  # invalid JSON or UTF-8, or nested too deep
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(doc)
    except ValidationError as e:
        raise _refusal(kind, doc, e.errors()[0]) from None


def _refusal(kind: type[BaseModel], doc: dict, error: dict) -> ApiError:
    """The 400 for pydantic's first `error`: the field (as a path such as `messages[2].role`),
    its declared description, and its value in the body."""
    model: type[BaseModel] | None = kind
    info: FieldInfo | None = None
    path, value, field, found = "", doc, "", None
    for part in error["loc"]:  # field names and indices; skip the union members' tags
        if isinstance(part, int) and isinstance(value, list):
            path, value = f"{path}[{part}]", value[part]
        elif model is not None and part in model.model_fields and isinstance(value, dict):
            info = model.model_fields[part]
            path, value = f"{path}.{part}" if path else part, value.get(part)
            field, found = path, value  # (the innermost field: the one its description is of)
            model = _inner_model(info.annotation)
    if info is None:
        return ApiError(400, f"the request body is invalid: {error['msg']}")
    if error["type"] == "missing":
        return ApiError(400, f"'{field}' is required: {info.description}", field)
    return ApiError(400, f"'{field}' must be {info.description}, got {_preview(found)}", field)


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, directly or in a list or union (Message in list[Message])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):  # (Annotated's first argument is the type it annotates)
        if (found := _inner_model(arg)) is not None:
            return found
    return None


def _preview(value: Any, chars: int = 60) -> str:
    """`value` as JSON, cut short (a refused field may be long)."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= chars else text[: chars - 3] + "..."
