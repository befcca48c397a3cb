"""The OpenAI API's requests as this server reads them (tasks/causal_lm/serve.py mounts the routes): the request
models, each field checked on entry with a message naming it and its limit, and OpenAI's error envelope
{"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneforge.serving.context import InvalidJSON, load_json
from tuneforge.tasks.causal_lm.data import ROLES
from tuneforge.tasks.causal_lm.engine import Params

MAX_STOP_STRINGS = 4  # OpenAI's limit


class OpenAIError(Exception):
    """An error a client gets in OpenAI's envelope, with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = status, message, param, code, type, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}},
                            self.status, headers=self.headers)


def _bounds(default=..., **bounds):
    """A field's bounds in the OpenAPI schema only: the checks themselves are generation_params' and chat_messages',
    whose messages name the field and the limit (max_tokens' maximum is the server's --max-tokens-cap, set by
    serve.OpenAIRoutes.body_openapi)."""
    return Field(default, json_schema_extra=bounds)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = _bounds(enum=list(ROLES))
    content: str | list[dict] | None = _bounds(None, minLength=1)


class OpenAIRequest(BaseModel):
    """What chat and plain completions share: the model and the generation settings."""
    model_config = ConfigDict(extra="allow")  # OpenAI clients send more than we use; see _UNSUPPORTED
    model: str
    max_tokens: int | None = _bounds(None, minimum=1)
    temperature: float | None = _bounds(None, minimum=0, maximum=2)
    top_p: float | None = _bounds(None, exclusiveMinimum=0, maximum=1)
    seed: int | None = _bounds(None, minimum=-2**63, maximum=2**63 - 1)  # (up to 2**64 - 1 accepted)
    stop: str | list[str] | None = _bounds(None, minLength=1, maxItems=MAX_STOP_STRINGS)
    stream: bool | None = False
    stream_options: dict | None = None
    n: int | None = _bounds(None, minimum=1, maximum=1)


class ChatRequest(OpenAIRequest):
    messages: list[_Message] = _bounds(minItems=1)
    max_completion_tokens: int | None = _bounds(None, minimum=1)


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] = _bounds(minLength=1, minItems=1, maxItems=1)


# parameters that would change the output in ways this server does not do: refused unless left at these values
_UNSUPPORTED = {"frequency_penalty": (0, None), "presence_penalty": (0, None), "logit_bias": ({}, None),
                "logprobs": (False, None, 0), "top_logprobs": (0, None), "tools": ([], None), "functions": ([], None),
                "tool_choice": ("none", "auto", None), "echo": (False, None), "best_of": (1, None), "suffix": ("", None),
                "response_format": ({"type": "text"}, None)}


def parse_body(raw: bytes, schema: type[BaseModel]):
    """The request body as `schema`, whatever its Content-Type: unparsable JSON is a 400, a bad field or a parameter
    this server does not honour a 422 naming it."""
    try:
        data = load_json(raw) if raw else None
    except InvalidJSON as err:
        raise OpenAIError(400, f"could not parse the JSON body of the request ({err}): send JSON "
                               "(Content-Type: application/json)") from None
    if data is None:
        raise OpenAIError(400, "the request has no JSON body")
    try:
        body = schema.model_validate(data, from_attributes=True)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        loc = lambda e: ".".join(str(p) for p in e["loc"]) or "body"  # noqa: E731
        raise OpenAIError(422, "invalid request: " + "; ".join(f"{loc(e)}: {e['msg']}" for e in errors),
                          param=loc(errors[0])) from None
    for name, allowed in _UNSUPPORTED.items():
        if name in (body.model_extra or {}) and body.model_extra[name] not in allowed:
            raise OpenAIError(422, f"{name} is not supported by this server (leave it out)", param=name, code="unsupported_parameter")
    return body


def generation_params(body: OpenAIRequest, max_tokens: int | None, default_max: int, cap: int) -> Params:
    """Generation settings from a request, each checked on entry."""
    if body.n not in (None, 1):
        raise OpenAIError(422, f"n is {body.n}: this server writes one choice per request (n must be 1)", param="n")
    if max_tokens is not None and max_tokens < 1:
        raise OpenAIError(422, f"max_tokens is {max_tokens}: it must be at least 1", param="max_tokens")
    if max_tokens is not None and max_tokens > cap:
        raise OpenAIError(422, f"max_tokens {max_tokens} is over this server's limit of {cap} (serve --max-tokens-cap)",
                          param="max_tokens")
    temperature = 0.0 if body.temperature is None else body.temperature
    if not 0 <= temperature <= 2:
        raise OpenAIError(422, f"temperature is {temperature}: it must be between 0 (greedy) and 2", param="temperature")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0 < top_p <= 1:
        raise OpenAIError(422, f"top_p is {top_p}: it must be above 0 and at most 1", param="top_p")
    if body.seed is not None and not -2**63 <= body.seed < 2**64:
        raise OpenAIError(422, "seed must fit in 64 bits", param="seed")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise OpenAIError(422, f"stop takes up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
    return Params(max_tokens or min(default_max, cap), temperature, top_p, body.seed, tuple(stop))


def chat_messages(messages: list[_Message]) -> list[dict]:
    """The messages as the template takes them. Roles system / user / assistant with text content; the last one is
    the user's (the model writes the assistant turn that follows it, as it was trained to)."""
    if not messages:
        raise OpenAIError(422, "messages is empty: send at least one user message", param="messages")
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise OpenAIError(422, f"messages[{i}].role is {m.role!r}: it must be one of {', '.join(ROLES)}",
                              param=f"messages.[{i}].role")
        content = m.content
        if isinstance(content, list):
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                raise OpenAIError(422, f"messages[{i}].content: only text parts are supported", param=f"messages.[{i}].content")
            content = "\n".join(part["text"] for part in content)
        if not content or not content.strip():
            raise OpenAIError(422, f"messages[{i}].content is empty", param=f"messages.[{i}].content")
        out.append({"role": m.role, "content": content})
    if out[-1]["role"] != "user":
        raise OpenAIError(422, f"the last message is the {out[-1]['role']}'s: it must be the user's (the model writes "
                               "the assistant's reply to it)", param="messages")
    return out


def prompt_text(messages: list[dict]) -> str:
    """What the request log and drift measure of a chat: its non-system turns, as the training data's prompts are."""
    return "\n".join(m["content"] for m in messages if m["role"] != "system").strip() or messages[0]["content"]
