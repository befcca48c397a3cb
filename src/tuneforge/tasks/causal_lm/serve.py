"""The OpenAI API of a causal-LM run, mounted by the task behind the serving seam (CausalLMTask.mount_routes):

    tuneforge serve runs/assistant
    OpenAI(base_url="http://localhost:8000/v1", api_key=KEY).chat.completions.create(
        model="assistant", messages=[{"role": "user", "content": "hi"}])

POST /v1/chat/completions (the run's chat template and system prompt, as in training), POST /v1/completions (the
prompt continued as it is, no template), GET /v1/models (one model: the run directory's name). Streaming is
server-sent events as OpenAI sends them. Errors carry OpenAI's envelope {"error": {"message", "type", "param",
"code"}}: 401 bad key, 400 unparsable JSON or a prompt over the context, 404 unknown model, 422 a bad field or a
limit (named; the requests and their checks: openai_requests.py). temperature defaults to 0 (greedy: what the
evaluation measured), not OpenAI's 1. Generation runs on engine.Engine, so concurrent requests share forward passes;
/v1/predict goes through it too.
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
from pydantic import BaseModel

from tuneforge.serving.context import json_body_openapi
from tuneforge.tasks.causal_lm.engine import Decoder, Engine, Params, Row, generate_rows
from tuneforge.tasks.causal_lm.openai_requests import (ChatRequest, CompletionRequest, OpenAIError, OpenAIRequest,
                                                       chat_messages, generation_params, parse_body, prompt_text)

log = logging.getLogger("tuneforge.serve")
HOLD_FILE_ENV = "TUNEFORGE_TEST_HOLD_FILE"  # tests: while this file exists the engine admits no new request
PRECISION_CHECK_PROMPTS = 3


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


class OpenAIRoutes:
    """The OpenAI API of one server. Built from the server's context when the task mounts its routes; `start` (a
    start-up hook, once the model is loaded) sets the predictor, the generation engine and its metrics, `stop`
    stops the engine."""

    def __init__(self, ctx):
        self.ctx, self.settings = ctx, ctx.settings
        config = self.settings.run_dir / "model" / "config.json"
        self.model_id = self.settings.run_dir.resolve().name
        self.created = int(config.stat().st_mtime) if config.is_file() else int(time.time())
        self.predictor = self.engine = self.metrics = None  # set by start()

    def option(self, key: str):
        """A causal-LM serve flag's value (see SPEC.serve_options): the one given, else its default."""
        from tuneforge.tasks.causal_lm.spec import SPEC

        defaults = {opt.key: opt.default for opt in SPEC.serve_options}
        return self.settings.options.get(key, defaults[key])

    def mount(self, app: FastAPI) -> None:
        app.add_exception_handler(OpenAIError, _openai_error)
        self.ctx.on_start(self.start)
        self.ctx.on_stop(self.stop)
        auth = [Depends(self.authorise)]
        app.post("/v1/chat/completions", dependencies=auth, openapi_extra=self.body_openapi(ChatRequest))(self.chat_completions)
        app.post("/v1/completions", dependencies=auth, openapi_extra=self.body_openapi(CompletionRequest))(self.completions)
        app.get("/v1/models", dependencies=auth)(self.models)
        app.get("/v1/models/{name}", dependencies=auth)(self.model)

    # --- start-up and shutdown

    def start(self) -> None:
        from tuneforge.models.device import cpu_has_fast_bf16

        predictor = self.ctx.predictor
        self.ctx.state["info"].update(model=self.model_id, precision=predictor.precision)
        # half precision on a GPU, or bf16 where the CPU computes it fast (elsewhere the fp32 pass would be slow)
        if predictor.precision in ("bf16", "fp16") and (predictor.device.type != "cpu" or cpu_has_fast_bf16()):
            self.check_precision(predictor)
        predictor.cast_weights()  # bf16 / fp16 weights, not autocast at every decoding step
        metrics = LMMetrics(self.ctx.metrics.registry)
        hold = os.environ.get(HOLD_FILE_ENV)
        engine = Engine(Decoder.of(predictor), self.settings.max_batch_size, self.settings.max_wait_ms,
                        on_forward=metrics.batch.observe, hold=(lambda: os.path.exists(hold)) if hold else None)
        engine.start()
        self.engine, self.metrics, self.predictor = engine, metrics, predictor
        self.ctx.state["predict"] = self.predict_texts  # /v1/predict shares the engine

    def check_precision(self, predictor) -> None:
        """The half-precision check (precision_check) into /ready, and a warning when it changes greedy outputs."""
        check = precision_check(predictor, self.settings.run_dir)
        self.ctx.state["info"]["bf16_check"] = check
        if "equal" in check:
            log.info("%s check: %d of %d greedy outputs equal fp32's", check["precision"], check["equal"], check["of"])
            if check["equal"] < check["of"]:
                log.warning("%s changes %d of %d greedy test outputs; serving in %s anyway (pass --precision fp32 "
                            "to serve exactly what the evaluation measured)", check["precision"],
                            check["of"] - check["equal"], check["of"], check["precision"])

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    def predict_texts(self, texts: list[str]) -> list[dict]:
        """/v1/predict (in the micro-batcher's thread): what `tuneforge predict` gives, generated by the engine."""
        predictor, engine = self.predictor, self.engine
        rows, events = [], []
        for text in texts:
            done = threading.Event()
            rows.append(Row(predictor.fit_prompt(predictor.text_prompt(text)), Params(predictor.max_new_tokens),
                            on_done=lambda r, done=done: (self.metrics.done(r), done.set())))
            events.append(done)
            engine.submit(rows[-1])
        for done in events:
            done.wait()
        if any(r.result.get("error") for r in rows):
            raise RuntimeError(next(r.result["error"] for r in rows if r.result.get("error")))
        return [{k: r.result[k] for k in ("completion", "finish_reason", "completion_tokens", "max_tokens")} for r in rows]

    # --- checks

    async def authorise(self, request: Request) -> None:
        """The server's bearer-key check, its 401 in OpenAI's error envelope."""
        try:
            await self.ctx.authorise(request)
        except HTTPException as err:
            raise OpenAIError(err.status_code, err.detail, code="invalid_api_key", headers=err.headers) from None

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise OpenAIError(404, f"The model {name!r} does not exist: this server serves {self.model_id!r} (GET /v1/models)",
                              param="model", code="model_not_found")

    def check_length(self, prompt: list[int], params: Params, explicit: bool, field_name: str) -> Params:
        """`params`, its default max_tokens shrunk to what fits the context; a prompt over the limits is a 400."""
        limit = self.option("max_prompt_tokens")
        if limit and len(prompt) > limit:
            raise OpenAIError(400, f"the prompt is {len(prompt)} tokens, over this server's limit of {limit} "
                                   "(serve --max-prompt-tokens): shorten the " + field_name,
                              param=field_name, code="context_length_exceeded")
        context = getattr(self.predictor.model.config, "max_position_embeddings", None)
        if context and len(prompt) + params.max_tokens > context:
            if not explicit and len(prompt) < context:  # the default budget shrinks to what fits
                params.max_tokens = context - len(prompt)
            else:
                raise OpenAIError(400, f"This model's maximum context length is {context} tokens; the prompt is "
                                       f"{len(prompt)} tokens and max_tokens asks for {params.max_tokens} more: shorten "
                                       f"the {field_name} or lower max_tokens", param=field_name, code="context_length_exceeded")
        return params

    def body_openapi(self, schema: type[BaseModel]) -> dict:
        """The request's OpenAPI schema, max_tokens at most this server's --max-tokens-cap."""
        extra = json_body_openapi(schema)
        fields = extra["requestBody"]["content"]["application/json"]["schema"]["properties"]
        for name in ("max_tokens", "max_completion_tokens"):
            if name in fields:
                fields[name]["maximum"] = self.option("max_tokens_cap")
        return extra

    # --- generation

    async def generate(self, body: OpenAIRequest, prompt: list[int], params: Params, log_text: str, chat: bool):
        """Submit the row to the engine; the reply streams (server-sent events) or comes once the row is done."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        metrics, engine = self.metrics, self.engine

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
                    self.ctx.record([log_text], [result], result["seconds"] * 1000)
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
            return _EventStream(self.events(queue, rid, now, chat, usage), row)
        return _Deferred(queue, row, lambda result: self.reply(result, rid, now, chat))

    def reply(self, result: dict, rid: str, now: int, chat: bool) -> JSONResponse:
        """The whole completion, as one JSON reply."""
        if result.get("error"):
            return OpenAIError(500, f"generation failed: {result['error']}", type="server_error").response()
        choice = {"index": 0, "logprobs": None, "finish_reason": result["finish_reason"]}
        choice.update({"message": {"role": "assistant", "content": result["completion"]}} if chat
                      else {"text": result["completion"]})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
                             "model": self.model_id, "choices": [choice], "usage": _usage(result)})

    def chunk(self, rid: str, now: int, chat: bool, usage: bool, text: str | None = None, role: bool = False,
              finish: str | None = None) -> dict:
        """One server-sent event of a stream: the role, a piece of text or how it finished."""
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        chunk = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": now,
                 "model": self.model_id, "choices": [choice]}
        if usage:
            chunk["usage"] = None
        return chunk

    async def events(self, queue: asyncio.Queue, rid: str, now: int, chat: bool, usage: bool):
        """The stream: the text as it comes (whatever piled up goes out as one chunk), the finish, the usage, [DONE]."""
        if chat:
            yield _sse(self.chunk(rid, now, chat, usage, role=True))
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
                yield _sse(self.chunk(rid, now, chat, usage, text="".join(pieces)))
            if kind == "done":
                result = value
        if result.get("error"):
            yield _sse({"error": {"message": f"generation failed: {result['error']}", "type": "server_error",
                                  "param": None, "code": None}})
        else:
            yield _sse(self.chunk(rid, now, chat, usage, finish=result["finish_reason"]))
            if usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": now,
                            "model": self.model_id, "choices": [], "usage": _usage(result)})
        yield _sse("[DONE]")

    # --- the routes

    async def chat_completions(self, request: Request):
        body = parse_body(await request.body(), ChatRequest)
        self.check_model(body.model)
        explicit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = generation_params(body, explicit, self.predictor.max_new_tokens, self.option("max_tokens_cap"))
        messages = chat_messages(body.messages)
        try:
            prompt = self.predictor.prompt_of(messages)
        except Exception as err:  # a template that refuses the turns' order, for one
            raise OpenAIError(422, f"the model's chat template cannot render these messages: {err}", param="messages") from None
        params = self.check_length(prompt, params, explicit is not None, "messages")
        return await self.generate(body, prompt, params, prompt_text(messages), chat=True)

    async def completions(self, request: Request):
        body = parse_body(await request.body(), CompletionRequest)
        self.check_model(body.model)
        params = generation_params(body, body.max_tokens, self.predictor.max_new_tokens, self.option("max_tokens_cap"))
        text = body.prompt
        if isinstance(text, list):
            if len(text) != 1:
                raise OpenAIError(422, f"prompt holds {len(text)} prompts: send one", param="prompt")
            text = text[0]
        if not text:
            raise OpenAIError(422, "prompt is empty", param="prompt")
        prompt = list(self.predictor.tokenizer(text, add_special_tokens=True)["input_ids"])
        params = self.check_length(prompt, params, body.max_tokens is not None, "prompt")
        return await self.generate(body, prompt, params, text, chat=False)

    def model_entry(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "tuneforge"}

    async def models(self):
        return {"object": "list", "data": [self.model_entry()]}

    async def model(self, name: str):
        self.check_model(name)
        return self.model_entry()


async def _openai_error(request: Request, err: OpenAIError):
    return err.response()


def mount(app: FastAPI, ctx) -> None:
    """The OpenAI routes on `app` (CausalLMTask.mount_routes), given the server's context (serving.context.ServeContext)."""
    OpenAIRoutes(ctx).mount(app)
