"""Request and response shapes of the HTTP API; Ray-free so unit tests check them directly.

The policy endpoints follow OpenAI's `/v1/chat/completions` and `/v1/completions`; every error is
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status (503 only
when a model is not configured or not ready).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(status, message)  # args rebuild it after pickling (replica -> ingress)
        self.status, self.message = status, message
        self.type, self.param, self.code = type, param, code

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        """The JSON body: `{"error": {...}}`."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class _Request(BaseModel):
    # OpenAI clients send fields we do not use (user, presence_penalty, ...): ignore those.
    model_config = ConfigDict(extra="ignore", frozen=True)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    role: str
    content: str


class _Sampling(_Request):
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> _Sampling:
        if self.min_tokens > self.wanted_tokens(default=self.min_tokens):
            raise ValueError("min_tokens must be <= max_tokens")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop takes at most 4 strings")
        return self

    def wanted_tokens(self, *, default: int) -> int:
        """`max_completion_tokens`, else `max_tokens`, else `default`."""
        return self.max_completion_tokens or self.max_tokens or default

    def stops(self) -> tuple[str, ...]:
        """The stop strings as a tuple (empty strings dropped)."""
        items = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in items if s)


class ChatRequest(_Sampling):
    """`POST /v1/chat/completions`."""

    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    """`POST /v1/completions`: one prompt or a list of prompts (text only)."""

    prompt: str | list[str]

    @model_validator(mode="after")
    def _prompts(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt list is empty")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ScoreRequest(_Request):
    """`POST /v1/score`: one conversation (`messages`) or many (`conversations`)."""

    model: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    conversations: list[list[Message]] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_of(self) -> ScoreRequest:
        if (self.messages is None) == (self.conversations is None):
            raise ValueError("give exactly one of 'messages' or 'conversations'")
        return self

    def all_conversations(self) -> list[list[Message]]:
        return [self.messages] if self.messages is not None else list(self.conversations or [])


class PairRequest(_Request):
    """A conversation (ending with the user turn) and two candidate assistant responses."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    response_a: str = Field(min_length=1)
    response_b: str = Field(min_length=1)


class LabelRequest(PairRequest):
    """`POST /v1/label`: AI feedback over `principle_ids` (or `num_principles` sampled ones)."""

    principle_ids: list[str] | None = Field(None, min_length=1)
    num_principles: int = Field(4, ge=1, le=64)
    few_shot: int = Field(0, ge=0, le=16)


class CritiqueRequest(_Request):
    """`POST /v1/critique`: critique and revise `response` (or the last assistant turn)."""

    messages: list[Message] = Field(min_length=1)
    response: str | None = Field(None, min_length=1)
    principle_ids: list[str] | None = Field(None, min_length=1)
    rounds: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)  # None: 64, within the server's limit
    temperature: float = Field(1.0, ge=0, le=2)
    seed: int = Field(0, ge=0, lt=2**63)
    few_shot: int | None = Field(None, ge=0)


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Decode a JSON body into `model`; a 400 ApiError naming the bad field otherwise."""
    try:
        data = json.loads(raw)
    except RecursionError:  # `[[[[...` deeper than Python's recursion limit
        raise ApiError(400, "invalid JSON body: nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # bad JSON, bad UTF-8, an integer over Python's 4300 digits
        raise ApiError(400, f"invalid JSON body: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the JSON body must be an object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        missing = err["type"] == "missing"
        message = f"{param}: field required" if missing else f"{param or 'body'}: {err['msg']}"
        code = "missing_field" if missing else "invalid_value"
        raise ApiError(400, message, param=param, code=code) from None


def usage(prompt_tokens: int, completion_tokens: int = 0) -> dict[str, int]:
    """OpenAI's usage block."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def text_pieces(text: str, size: int = 16) -> list[str]:
    """The generated text cut into stream deltas (the HF engine has no token streaming)."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]
