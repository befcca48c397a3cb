"""The HTTP service: FastAPI, model loaded once in `lifespan`, micro-batched predictions, bearer-key
auth, request limits (body size, a stalled upload, hostile JSON: each a 4xx), Prometheus metrics, request log and
drift monitor.

    tuneforge serve runs/sentiment --api-key-env TUNEFORGE_API_KEY

Any task plugs in through a `predict(texts) -> [{"label": ..., "probabilities": {...}}]` callable
and its label names, and may mount routes of its own (`task.mount_routes(app, ctx)`, given a ServeContext:
the causal LM mounts the OpenAI API); nothing here is specific to one task.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from tuneforge.serving.batcher import MicroBatcher
from tuneforge.drift import DEFAULT_THRESHOLDS, NO_LABEL, logged_label
from tuneforge.serving.monitor import RequestLog, drift_report, log_url

if TYPE_CHECKING:
    import torch

log = logging.getLogger("tuneforge.serve")


@dataclass
class ServeSettings:
    run_dir: Path
    api_key: str | None = None                # None only with no_auth
    max_batch_size: int = 64
    max_wait_ms: float = 10.0                 # under load only; 0 = greedy (see batcher.py)
    max_texts: int = 64                       # per request
    max_chars: int = 10_000                   # per text
    max_body_bytes: int = 1_000_000           # 413 above it, by Content-Length or counted as a chunked body arrives
    body_timeout_s: float = 30.0              # 408 when a client takes longer to send its body (stalled or trickling)
    request_timeout_s: float = 30.0
    monitor_url: str | None = None            # default: sqlite file in the run directory
    retention_days: float = 30.0
    log_text: bool = False
    drift_window: int = 1000
    drift_min_rows: int = 50
    drift_thresholds: dict = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    max_tokens_cap: int = 512                 # causal LM: max_tokens a request may ask for
    max_prompt_tokens: int | None = None      # causal LM: None = the model's context window


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str]


class InvalidJSON(ValueError):
    """A request body that is not JSON a client should send; the message says what is wrong with it."""


def _no_constant(name: str):
    raise InvalidJSON(f"{name} is not a JSON value: send numbers only")


def load_json(raw: bytes):
    """The body as JSON, strictly: NaN / Infinity literals, nesting too deep for the parser, non-UTF-8 bytes and strings
    holding a lone surrogate (which no tokenizer, log or response can encode) are InvalidJSON, not a 500 later."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise InvalidJSON(f"{err.msg} at character {err.pos}") from None
    except UnicodeDecodeError:
        raise InvalidJSON("the body is not UTF-8") from None
    except RecursionError:
        raise InvalidJSON("nested too deeply") from None
    try:
        json.dumps(data, ensure_ascii=False).encode()  # what a log or a reply will do with its strings
    except UnicodeEncodeError:
        raise InvalidJSON("a string holds a lone surrogate (\\ud800-\\udfff): not valid Unicode") from None
    except RecursionError:
        raise InvalidJSON("nested too deeply") from None
    return data


def json_body_openapi(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route that parses its body itself: the model's JSON schema, its $defs inlined (a $ref
    into the model's own $defs does not resolve inside the OpenAPI document)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


class BodyLimits:
    """ASGI middleware: a body over `max_bytes` is a 413, by its Content-Length before any of it is read or counted as
    it arrives (a chunked upload has no Content-Length); a body not in within `timeout_s` of the route asking for it (a
    client stalled or trickling a byte at a time) is a 408. Either way the connection is freed and the model never sees
    the body."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    def _too_big(self) -> HTTPException:
        return HTTPException(413, f"request body over the limit of {self.max_bytes} bytes (serve --max-body-bytes)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse({"detail": self._too_big().detail}, 413)(scope, receive, send)
        received, complete, deadline = 0, False, None

        async def limited_receive():
            nonlocal received, complete, deadline
            if complete:  # the body is in: what follows is the wait for a disconnect, which takes as long as it takes
                return await receive()
            deadline = deadline or time.monotonic() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.timeout_s:g} s "
                                         "(serve --body-timeout-s)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_big()
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        await self.app(scope, limited_receive, send)


def parse_predict_request(raw: bytes) -> PredictRequest:
    """The body read as JSON whatever its Content-Type says (`curl -d` sends application/x-www-form-urlencoded).

    Errors are the ones FastAPI gives a JSON body, so clients see the same 422 "invalid request: ..." messages.
    """
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        data = load_json(raw)
    except InvalidJSON as err:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": f"JSON decode error: {err}",
                                       "input": {}}]) from None
    try:
        # from_attributes: a non-object body reads "Input should be a valid dictionary or object ...", as in FastAPI
        return PredictRequest.model_validate(data, from_attributes=True)
    except ValidationError as err:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors(include_url=False)]) from None


_PREDICT_OPENAPI = json_body_openapi(PredictRequest)


class _Metrics:
    def __init__(self, labels: list[str]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("tuneforge_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("tuneforge_request_latency_seconds", "Request latency", ["endpoint"], registry=r,
                                 buckets=(.002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch = Histogram("tuneforge_batch_size", "Texts per forward pass", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.labels = Counter("tuneforge_predicted_label", "Predicted labels", ["label"], registry=r)
        self.confidence = Histogram("tuneforge_prediction_confidence", "Confidence of the predicted label", registry=r,
                                    buckets=(.5, .6, .7, .8, .9, .95, .99, 1.0))
        self.drift = Gauge("tuneforge_drift_psi", "Population stability index vs the training reference", ["signal"], registry=r)
        self.drift_alarm = Gauge("tuneforge_drift_alarm", "1 when a signal's PSI exceeds its threshold", ["signal"], registry=r)
        for lab in labels:
            self.labels.labels(lab)


@dataclass
class ServeContext:
    """What a task's `mount_routes(app, ctx)` gets. `authorise` is a FastAPI dependency (bearer key); `on_start(fn)` and
    `on_stop(fn)` register calls made in the lifespan after the model is loaded and before it is released. From
    start-up on: `predictor`, `metrics` (its `.registry` takes the task's own metrics), `request_log`, and
    `record(texts, results, latency_ms)`, which counts results and logs them as /v1/predict does. A start hook may
    replace `state["predict"]` (what /v1/predict calls) and add JSON to /ready under `state["info"]`."""
    settings: ServeSettings
    authorise: Callable
    state: dict
    start_hooks: list[Callable[[], None]] = field(default_factory=list)
    stop_hooks: list[Callable[[], None]] = field(default_factory=list)

    def on_start(self, fn: Callable[[], None]) -> None:
        self.start_hooks.append(fn)

    def on_stop(self, fn: Callable[[], None]) -> None:
        self.stop_hooks.append(fn)

    @property
    def predictor(self):
        return self.state["predictor"]

    @property
    def metrics(self) -> "_Metrics":
        return self.state["metrics"]

    @property
    def request_log(self) -> RequestLog:
        return self.state["log"]

    def record(self, texts: list[str], results: list[dict], latency_ms: float) -> None:
        """Predicted labels and confidence into the metrics, and each result into the request log (any thread)."""
        decisions = [self.state["observe"](r) for r in results]
        for chosen, conf in decisions:
            for label in chosen or [NO_LABEL]:  # multi-label: each label counts, not each combination
                self.metrics.labels.labels(label).inc()
            self.metrics.confidence.observe(conf)
        self.request_log.write(texts, [logged_label(c) for c, _ in decisions], [conf for _, conf in decisions], latency_ms)


def create_app(settings: ServeSettings, load_predictor: Callable[[], tuple[Callable, list[str]]],
               reference: dict | None = None) -> FastAPI:
    """`load_predictor()` returns (predict(texts) -> results, label names, observe(result) -> (labels, confidence));
    it runs once, at start-up. `observe` is the task's view of one result for metrics and the request log. A loader
    with a `task` attribute (run_predictor's) lets that task mount its own routes."""
    state: dict = {"info": {}}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        predict, labels, observe = load_predictor()
        metrics = _Metrics(labels)
        request_log = RequestLog(log_url(settings.run_dir, settings.monitor_url), settings.retention_days, settings.log_text)
        state.update(predictor=getattr(load_predictor, "predictor", None), predict=predict, observe=observe,
                     metrics=metrics, log=request_log)

        def predict_observed(texts: list[str]) -> list[dict]:
            """Runs in the batch worker thread: model, metrics and request log, off the event loop."""
            t0 = time.perf_counter()
            results = state["predict"](texts)
            metrics.batch.observe(len(texts))
            ctx.record(texts, results, (time.perf_counter() - t0) * 1000)
            return results

        for hook in ctx.start_hooks:
            await run_in_threadpool(hook)  # e.g. a start-up check that generates: off the event loop
        batcher = MicroBatcher(predict_observed, settings.max_batch_size, settings.max_wait_ms)
        batcher.start()
        state.update(batcher=batcher, ready=True)
        yield
        state["ready"] = False
        await batcher.stop()
        for hook in ctx.stop_hooks:
            await run_in_threadpool(hook)
        request_log.close()

    app = FastAPI(title="tuneforge", lifespan=lifespan)

    async def authorise(request: Request) -> None:  # async: no thread-pool hop per request
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), settings.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                headers={"WWW-Authenticate": "Bearer"})

    ctx = ServeContext(settings, authorise, state)
    known_paths: set[str] = set()  # filled on first request, when every route is registered
    app.add_middleware(BodyLimits, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)  # inside `measure`

    @app.middleware("http")
    async def measure(request: Request, call_next):
        t0 = time.perf_counter()
        endpoint = request.url.path
        response = await call_next(request)
        if not known_paths:
            known_paths.update(r.path for r in app.routes)
        if "metrics" in state and endpoint in known_paths:
            state["metrics"].requests.labels(endpoint, str(response.status_code)).inc()
            state["metrics"].latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": f"invalid request: {problems}. Expected JSON {{\"texts\": [\"...\"]}}"}, 422)

    @app.get("/health")
    async def health():
        return {"status": "alive"}

    @app.get("/ready")
    async def ready():
        if not state.get("ready"):
            return JSONResponse({"status": "loading"}, 503)
        return {"status": "ready", **state["info"]}

    @app.get("/metrics")
    async def prometheus():
        await run_in_threadpool(_update_drift_gauges)  # a database query: off the event loop
        return Response(generate_latest(state["metrics"].registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/predict", dependencies=[Depends(authorise)], openapi_extra=_PREDICT_OPENAPI,
              responses={422: {"description": "invalid request, or a limit exceeded (named in `detail`)"}})
    async def predict(request: Request):
        body = parse_predict_request(await request.body())  # JSON whatever the Content-Type (curl -d)
        if not body.texts:
            raise HTTPException(422, "texts is empty: send at least one text")
        if len(body.texts) > settings.max_texts:
            raise HTTPException(422, f"{len(body.texts)} texts is over the limit of {settings.max_texts} per request")
        too_long = [i for i, t in enumerate(body.texts) if len(t) > settings.max_chars]
        if too_long:
            raise HTTPException(422, f"text {too_long[0]} is over the limit of {settings.max_chars} characters")
        try:
            results = await asyncio.wait_for(state["batcher"].submit(body.texts), settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"prediction took longer than {settings.request_timeout_s} s") from None
        return {"predictions": results}

    def _report() -> dict:
        rows = state["log"].recent(settings.drift_window)
        report = drift_report(reference, rows, settings.drift_thresholds, settings.drift_min_rows)
        for name, sig in report["signals"].items():
            if sig["drift"]:
                log.warning("drift on %s: PSI %.3f > %.3f", name, sig["psi"], sig["threshold"])
        return report

    def _update_drift_gauges() -> None:
        for name, sig in _report()["signals"].items():
            state["metrics"].drift.labels(name).set(sig["psi"])
            state["metrics"].drift_alarm.labels(name).set(1 if sig["drift"] else 0)

    @app.get("/v1/monitor", dependencies=[Depends(authorise)])
    async def monitor():
        return await run_in_threadpool(_report)

    task = getattr(load_predictor, "task", None)
    if task is not None:
        task.mount_routes(app, ctx)
    return app


@dataclass
class RunPredictor:
    """Loads, at start-up, the predictor of the run's task (from the run's config.yaml; text classification for runs
    that predate the task field). Its `task` mounts any routes of its own; `predictor` is set once loaded."""
    run_dir: Path
    device: str | torch.device = "cpu"
    precision: str = "fp32"
    predictor: object = None

    @property
    def task(self):
        from tuneforge.artifacts import run_task_type
        from tuneforge.tasks import get_task

        return get_task(run_task_type(self.run_dir))

    def __call__(self) -> tuple[Callable, list[str], Callable]:
        task = self.task
        self.predictor = task.load_predictor(self.run_dir / "model", self.device, self.precision)
        log.info("model on %s, %s", self.predictor.device, self.predictor.precision)
        return self.predictor.predict, task.label_names(self.predictor), task.observe


def run_predictor(run_dir: Path, device: str | torch.device = "cpu", precision: str = "fp32") -> RunPredictor:
    return RunPredictor(Path(run_dir), device, precision)


def require_promoted(run_dir: Path, force: bool) -> None:
    """Serving refuses a run the evaluation gate did not promote, unless forced."""
    from tuneforge.errors import OutputError

    metrics_path = run_dir / "metrics.json"
    if not (run_dir / "model" / "model.safetensors").is_file():
        raise OutputError(f"{run_dir} holds no finished run (model/model.safetensors missing)",
                          fix="pass the output directory of a finished `tuneforge run`")
    promoted = json.loads(metrics_path.read_text()).get("promoted") if metrics_path.is_file() else None
    if promoted is not True and not force:
        reason = json.loads(metrics_path.read_text()).get("promotion_reason", "no gate result") if metrics_path.is_file() else "no metrics.json"
        raise OutputError(f"the run in {run_dir} was not promoted by the evaluation gate ({reason})",
                          fix="improve the model, or pass --force to serve it anyway")
