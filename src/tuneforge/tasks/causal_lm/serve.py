"""The OpenAI API of a causal-LM run, mounted by the task behind the serving seam (CausalLMTask.mount_routes):

    tuneforge serve runs/assistant
    OpenAI(base_url="http://localhost:8000/v1", api_key=KEY).chat.completions.create(
        model="assistant", messages=[{"role": "user", "content": "hi"}])

POST /v1/chat/completions (the run's chat template and system prompt, as in training), POST /v1/completions (the
prompt continued as it is, no template), GET /v1/models (one model: the run directory's name). Streaming is
server-sent events as OpenAI sends them. Errors carry OpenAI's envelope {"error": {"message", "type", "param",
"code"}}: 401 bad key, 400 unparsable JSON or a prompt over the context, 404 unknown model, 422 a bad field or a
limit (named). temperature defaults to 0 (greedy: what the evaluation measured), not OpenAI's 1. Generation runs
on engine.Engine, so concurrent requests share forward passes; /v1/predict goes through it too.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from typing import Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneforge.serving.app import InvalidJSON, json_body_openapi, load_json
from tuneforge.tasks.causal_lm.data import ROLES
from tuneforge.tasks.causal_lm.engine import Decoder, Engine, Params, Row, generate_rows

log = logging.getLogger("tuneforge.serve")
HOLD_FILE_ENV = "TUNEFORGE_TEST_HOLD_FILE"  # tests: while this file exists the engine admits no new request
MAX_STOP_STRINGS = 4                        # OpenAI's limit
PRECISION_CHECK_PROMPTS = 3


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = status, message, param, code, type, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}},
                            self.status, headers=self.headers)


# ------------------------------------------------------------------ requests

def _bounds(default=..., **bounds):
    """A field's bounds in the OpenAPI schema only: the checks themselves are _params' and _chat_messages', whose
    messages name the field and the limit (max_tokens' maximum is the server's --max-tokens-cap, set in `mount`)."""
    return Field(default, json_schema_extra=bounds)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = _bounds(enum=list(ROLES))
    content: str | list[dict] | None = _bounds(None, minLength=1)


class _Request(BaseModel):
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


class ChatRequest(_Request):
    messages: list[_Message] = _bounds(minItems=1)
    max_completion_tokens: int | None = _bounds(None, minimum=1)


class CompletionRequest(_Request):
    prompt: str | list[str] = _bounds(minLength=1, minItems=1, maxItems=1)


# parameters that would change the output in ways this server does not do: refused unless left at these values
_UNSUPPORTED = {"frequency_penalty": (0, None), "presence_penalty": (0, None), "logit_bias": ({}, None),
                "logprobs": (False, None, 0), "top_logprobs": (0, None), "tools": ([], None), "functions": ([], None),
                "tool_choice": ("none", "auto", None), "echo": (False, None), "best_of": (1, None), "suffix": ("", None),
                "response_format": ({"type": "text"}, None)}


def _parse(raw: bytes, schema: type[BaseModel]):
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


def _params(body: _Request, max_tokens: int | None, default_max: int, cap: int) -> Params:
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


def _chat_messages(messages: list[_Message]) -> list[dict]:
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


# ------------------------------------------------------------------ metrics and the start-up check

class LMMetrics:
    def __init__(self, registry):
        from prometheus_client import Counter, Gauge, Histogram

        r = registry
        self.prompt_tokens = Counter("tuneforge_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter("tuneforge_completion_tokens", "Tokens generated", registry=r)
        self.completions = Counter("tuneforge_completions", "Completions by how they ended", ["finish_reason"], registry=r)
        self.ttft = Histogram("tuneforge_time_to_first_token_seconds", "From arrival to the first token", registry=r,
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.speed = Histogram("tuneforge_completion_tokens_per_second", "Per request: tokens / seconds since its prefill",
                               registry=r, buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000))
        self.batch = Histogram("tuneforge_generation_batch_size", "Sequences per forward pass of the generation engine",
                               registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.in_flight = Gauge("tuneforge_requests_in_flight", "Completion requests waiting for or in generation", registry=r)
        for reason in ("stop", "length", "cancelled", "error"):
            self.completions.labels(reason)

    def done(self, result: dict) -> None:
        self.completions.labels(result["finish_reason"]).inc()
        if result["ttft_s"] is not None:  # it was prefilled
            self.prompt_tokens.inc(result["prompt_tokens"])
            self.completion_tokens.inc(result["completion_tokens"])
        if result["finish_reason"] in ("stop", "length"):
            self.ttft.observe(result["ttft_s"])
            if result["tokens_per_s"]:
                self.speed.observe(result["tokens_per_s"])


def precision_check(predictor, run_dir, prompts: list[str] | None = None) -> dict:
    """Greedy outputs on the run's first test prompts (metrics.json samples) in the predictor's precision and in fp32:
    how many agree. bf16 can change a greedy choice where two tokens are close."""
    if prompts is None:
        path = run_dir / "metrics.json"
        samples = json.loads(path.read_text()).get("samples", []) if path.is_file() else []
        prompts = [s["prompt"] for s in samples][:PRECISION_CHECK_PROMPTS]
    if not prompts:
        return {"skipped": "no test prompts in metrics.json samples"}
    ids = [predictor.fit_prompt(predictor.text_prompt(p)) for p in prompts]
    max_tokens = min(predictor.max_new_tokens, 64)
    outputs = {}
    for precision in ("fp32", predictor.precision):  # fp32 first, while the weights still are
        if precision != "fp32":
            predictor.cast_weights()
        rows = [Row(p, Params(max_tokens)) for p in ids]
        outputs[precision] = [r["completion"] for r in generate_rows(Decoder.of(predictor, precision), rows)]
    equal = sum(a == b for a, b in zip(outputs[predictor.precision], outputs["fp32"]))
    return {"precision": predictor.precision, "equal": equal, "of": len(ids), "max_tokens": max_tokens}


# ------------------------------------------------------------------ the routes

class _EventStream(StreamingResponse):
    """Server-sent events that cancel their row however the response ends (a client gone mid-stream included)."""

    def __init__(self, events, row: Row):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.row = row

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.row.cancel()


class _Deferred(Response):
    """A reply sent once the row is done; a client that leaves first cancels the row. (It listens on `receive`, as a
    streaming response does: `request.is_disconnected()` does not see a disconnect through the app's middleware.)"""

    def __init__(self, queue: asyncio.Queue, row: Row, reply: Callable[[dict], Response]):
        super().__init__()
        self.queue, self.row, self.reply = queue, row, reply

    async def _result(self) -> dict:
        while True:
            kind, value = await self.queue.get()
            if kind == "done":
                return value

    async def __call__(self, scope, receive, send):
        async def client_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        result, gone = asyncio.ensure_future(self._result()), asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not result.done():
                result.cancel()
            self.row.cancel()  # a no-op once done
        if not result.cancelled():
            await self.reply(result.result())(scope, receive, send)


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False) if not isinstance(data, str) else data}\n\n"


def _usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}


def mount(app: FastAPI, ctx) -> None:
    settings = ctx.settings
    model_id = settings.run_dir.resolve().name
    created = int((settings.run_dir / "model" / "config.json").stat().st_mtime) \
        if (settings.run_dir / "model" / "config.json").is_file() else int(time.time())
    runtime: dict = {}

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, err: OpenAIError):
        return err.response()

    async def authorise(request: Request) -> None:
        try:
            await ctx.authorise(request)
        except HTTPException as err:
            raise OpenAIError(err.status_code, err.detail, code="invalid_api_key", headers=err.headers) from None

    def start() -> None:
        from tuneforge.models.device import cpu_has_fast_bf16

        predictor = ctx.predictor
        ctx.state["info"].update(model=model_id, precision=predictor.precision)
        # half precision on a GPU, or bf16 where the CPU computes it fast (elsewhere the fp32 pass would be slow)
        if predictor.precision in ("bf16", "fp16") and (predictor.device.type != "cpu" or cpu_has_fast_bf16()):
            check = precision_check(predictor, settings.run_dir)
            ctx.state["info"]["bf16_check"] = check
            if "equal" in check:
                log.info("%s check: %d of %d greedy outputs equal fp32's", check["precision"], check["equal"], check["of"])
                if check["equal"] < check["of"]:
                    log.warning("%s changes %d of %d greedy test outputs; serving in %s anyway (pass --precision fp32 "
                                "to serve exactly what the evaluation measured)", check["precision"],
                                check["of"] - check["equal"], check["of"], check["precision"])
        predictor.cast_weights()  # bf16 / fp16 weights, not autocast at every decoding step
        metrics = LMMetrics(ctx.metrics.registry)
        hold = os.environ.get(HOLD_FILE_ENV)
        engine = Engine(Decoder.of(predictor), settings.max_batch_size, settings.max_wait_ms, on_forward=metrics.batch.observe,
                        hold=(lambda: os.path.exists(hold)) if hold else None)
        engine.start()
        runtime.update(engine=engine, metrics=metrics, predictor=predictor)
        ctx.state["predict"] = predict_texts  # /v1/predict shares the engine

    def stop() -> None:
        if "engine" in runtime:
            runtime["engine"].stop()

    ctx.on_start(start)
    ctx.on_stop(stop)

    def predict_texts(texts: list[str]) -> list[dict]:
        """/v1/predict (in the micro-batcher's thread): what `tuneforge predict` gives, generated by the engine."""
        predictor, engine = runtime["predictor"], runtime["engine"]
        rows, events = [], []
        for text in texts:
            done = threading.Event()
            rows.append(Row(predictor.fit_prompt(predictor.text_prompt(text)), Params(predictor.max_new_tokens),
                            on_done=lambda r, done=done: (runtime["metrics"].done(r), done.set())))
            events.append(done)
            engine.submit(rows[-1])
        for done in events:
            done.wait()
        if any(r.result.get("error") for r in rows):
            raise RuntimeError(next(r.result["error"] for r in rows if r.result.get("error")))
        return [{k: r.result[k] for k in ("completion", "finish_reason", "completion_tokens", "max_tokens")} for r in rows]

    def check_model(name: str) -> None:
        if name != model_id:
            raise OpenAIError(404, f"The model {name!r} does not exist: this server serves {model_id!r} (GET /v1/models)",
                              param="model", code="model_not_found")

    def check_length(prompt: list[int], params: Params, explicit: bool, field_name: str) -> Params:
        limit = settings.max_prompt_tokens
        if limit and len(prompt) > limit:
            raise OpenAIError(400, f"the prompt is {len(prompt)} tokens, over this server's limit of {limit} "
                                   "(serve --max-prompt-tokens): shorten the " + field_name,
                              param=field_name, code="context_length_exceeded")
        context = getattr(runtime["predictor"].model.config, "max_position_embeddings", None)
        if context and len(prompt) + params.max_tokens > context:
            if not explicit and len(prompt) < context:  # the default budget shrinks to what fits
                params.max_tokens = context - len(prompt)
            else:
                raise OpenAIError(400, f"This model's maximum context length is {context} tokens; the prompt is "
                                       f"{len(prompt)} tokens and max_tokens asks for {params.max_tokens} more: shorten "
                                       f"the {field_name} or lower max_tokens", param=field_name, code="context_length_exceeded")
        return params

    async def generate(body: _Request, prompt: list[int], params: Params, log_text: str, chat: bool):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        metrics, engine = runtime["metrics"], runtime["engine"]

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutting down)
                pass

        def on_done(result: dict) -> None:  # generation thread
            try:
                metrics.in_flight.dec()
                metrics.done(result)
                if result["finish_reason"] in ("stop", "length"):
                    ctx.record([log_text], [result], result["seconds"] * 1000)
            except Exception:  # a metrics or log failure must not fail the generation
                log.exception("recording a completion failed")
            finally:
                put(("done", result))

        stream = bool(body.stream)
        row = Row(prompt, params, on_text=(lambda text: put(("text", text))) if stream else None, on_done=on_done)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())
        metrics.in_flight.inc()
        try:
            engine.submit(row)
        except RuntimeError as err:
            metrics.in_flight.dec()
            raise OpenAIError(503, str(err), type="server_error") from None
        if stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return _EventStream(_events(queue, rid, now, chat, usage), row)
        def reply(result: dict) -> JSONResponse:
            if result.get("error"):
                return OpenAIError(500, f"generation failed: {result['error']}", type="server_error").response()
            choice = {"index": 0, "logprobs": None, "finish_reason": result["finish_reason"]}
            choice.update({"message": {"role": "assistant", "content": result["completion"]}} if chat
                          else {"text": result["completion"]})
            return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
                                 "model": model_id, "choices": [choice], "usage": _usage(result)})

        return _Deferred(queue, row, reply)

    def _chunk(rid: str, now: int, chat: bool, usage: bool, text: str | None = None, role: bool = False,
               finish: str | None = None) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        chunk = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": now,
                 "model": model_id, "choices": [choice]}
        if usage:
            chunk["usage"] = None
        return chunk

    async def _events(queue: asyncio.Queue, rid: str, now: int, chat: bool, usage: bool):
        if chat:
            yield _sse(_chunk(rid, now, chat, usage, role=True))
        result = None
        while result is None:
            kind, value = await queue.get()
            pieces = []
            while kind == "text":  # whatever piled up goes out as one chunk
                pieces.append(value)
                if queue.empty():
                    break
                kind, value = queue.get_nowait()
            if pieces:
                yield _sse(_chunk(rid, now, chat, usage, text="".join(pieces)))
            if kind == "done":
                result = value
        if result.get("error"):
            yield _sse({"error": {"message": f"generation failed: {result['error']}", "type": "server_error",
                                  "param": None, "code": None}})
        else:
            yield _sse(_chunk(rid, now, chat, usage, finish=result["finish_reason"]))
            if usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": now,
                            "model": model_id, "choices": [], "usage": _usage(result)})
        yield _sse("[DONE]")

    def body_openapi(schema: type[BaseModel]) -> dict:
        """The request's OpenAPI schema, max_tokens at most this server's --max-tokens-cap."""
        extra = json_body_openapi(schema)
        fields = extra["requestBody"]["content"]["application/json"]["schema"]["properties"]
        for name in ("max_tokens", "max_completion_tokens"):
            if name in fields:
                fields[name]["maximum"] = settings.max_tokens_cap
        return extra

    @app.post("/v1/chat/completions", dependencies=[Depends(authorise)], openapi_extra=body_openapi(ChatRequest))
    async def chat_completions(request: Request):
        body = _parse(await request.body(), ChatRequest)
        check_model(body.model)
        explicit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = _params(body, explicit, runtime["predictor"].max_new_tokens, settings.max_tokens_cap)
        messages = _chat_messages(body.messages)
        try:
            prompt = runtime["predictor"].prompt_of(messages)
        except Exception as err:  # a template that refuses the turns' order, for one
            raise OpenAIError(422, f"the model's chat template cannot render these messages: {err}", param="messages") from None
        params = check_length(prompt, params, explicit is not None, "messages")
        return await generate(body, prompt, params, prompt_text(messages), chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorise)], openapi_extra=body_openapi(CompletionRequest))
    async def completions(request: Request):
        body = _parse(await request.body(), CompletionRequest)
        check_model(body.model)
        params = _params(body, body.max_tokens, runtime["predictor"].max_new_tokens, settings.max_tokens_cap)
        text = body.prompt
        if isinstance(text, list):
            if len(text) != 1:
                raise OpenAIError(422, f"prompt holds {len(text)} prompts: send one", param="prompt")
            text = text[0]
        if not text:
            raise OpenAIError(422, "prompt is empty", param="prompt")
        prompt = list(runtime["predictor"].tokenizer(text, add_special_tokens=True)["input_ids"])
        params = check_length(prompt, params, body.max_tokens is not None, "prompt")
        return await generate(body, prompt, params, text, chat=False)

    def model_entry() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "tuneforge"}

    @app.get("/v1/models", dependencies=[Depends(authorise)])
    async def models():
        return {"object": "list", "data": [model_entry()]}

    @app.get("/v1/models/{name}", dependencies=[Depends(authorise)])
    async def model(name: str):
        check_model(name)
        return model_entry()
