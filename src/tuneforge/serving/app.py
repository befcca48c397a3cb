"""The HTTP service: FastAPI, model loaded once in `lifespan`, micro-batched predictions, bearer-key
auth, request limits (body size, a stalled upload, hostile JSON: each a 4xx), Prometheus metrics, request log and
drift monitor.

    tuneforge serve runs/sentiment --api-key-env TUNEFORGE_API_KEY

Any task plugs in through a `predict(inputs) -> [prediction, ...]` callable and its label names; its spec names
the /v1/predict body (`request`, whose `inputs` field holds the texts, images, ...) and its `check_inputs` and
`input_size` say what is refused and how big an input is; it may mount routes of its own
(`task.mount_routes(app, ctx)`, given a ServeContext, see context.py: the causal LM mounts the OpenAI API). Nothing
here is specific to one task.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from tuneforge.serving.batcher import MicroBatcher
from tuneforge.serving.context import InvalidJSON, ServeContext, ServeMetrics, ServeSettings, json_body_openapi, load_json
from tuneforge.serving.monitor import RequestLog, drift_report, log_url

if TYPE_CHECKING:
    import torch

log = logging.getLogger("tuneforge.serve")


@dataclass(frozen=True)
class PredictInputs:
    """What /v1/predict reads, from the served task: the body's model, the field holding the inputs, the check that
    refuses some (a 422 reason, or None) and an input's size for the request log and drift."""
    request: type[BaseModel]
    field: str
    check: Callable[[list, ServeSettings], str | None]
    size: Callable[[object], int]
    example: str
    upload: Callable[[bytes, str], dict | None]  # a non-JSON body (multipart) as the request, or None
    measure: Callable[[object], dict]  # the task's other measures of an input, for drift (an image's brightness)

    @classmethod
    def of(cls, task) -> "PredictInputs":
        """The served task's (None: texts, as the text tasks read them)."""
        from tuneforge.tasks import get_spec
        from tuneforge.tasks.base import TaskDefaults
        from tuneforge.tasks.spec import TaskSpec, TextsRequest

        spec = get_spec(task.name) if task is not None else TaskSpec("", object, {}, (), (), "", "", request=TextsRequest)
        task = task if task is not None else TaskDefaults()
        return cls(spec.request, spec.inputs, task.check_inputs, task.input_size, spec.request_example(), task.parse_upload,
                   task.measure_input)


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


def parse_predict_request(body: bytes, model: type[BaseModel], content_type: str = "",
                          upload: Callable[[bytes, str], dict | None] | None = None) -> BaseModel:
    """The body as the task's request `model`: an upload the task reads itself (`upload`: multipart), else JSON
    whatever its Content-Type says (`curl -d` sends application/x-www-form-urlencoded). Errors are the ones FastAPI
    gives a JSON body, so clients see the same 422 "invalid request: ..." messages.
    """
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    uploaded = upload(body, content_type) if upload is not None else None
    try:
        data = uploaded if uploaded is not None else load_json(body)
    except InvalidJSON as err:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": f"JSON decode error: {err}",
                                       "input": {}}]) from None
    try:
        # from_attributes: a non-object body reads "Input should be a valid dictionary or object ...", as in FastAPI
        return model.model_validate(data, from_attributes=True)
    except ValidationError as err:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors(include_url=False)]) from None


def create_app(settings: ServeSettings, load_predictor: Callable[[], tuple[Callable, list[str]]],
               reference: dict | None = None) -> FastAPI:
    """`load_predictor()` returns (predict(texts) -> results, label names, observe(result) -> (labels, confidence));
    it runs once, at start-up. `observe` is the task's view of one result for metrics and the request log. A loader
    with a `task` attribute (run_predictor's) lets that task mount its own routes, given the ServeContext."""
    task = getattr(load_predictor, "task", None)
    inputs = PredictInputs.of(task)
    ctx = ServeContext(settings, input_size=inputs.size, measure_input=inputs.measure)
    app = FastAPI(title="tuneforge", lifespan=_lifespan(ctx, load_predictor))
    app.add_middleware(BodyLimits, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)  # inside `measure`
    _measure_requests(app, ctx.state)

    async def invalid_request(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": f"invalid request: {problems}. Expected JSON {inputs.example}"}, 422)

    app.add_exception_handler(RequestValidationError, invalid_request)
    _mount_routes(app, ctx, reference, inputs)
    if task is not None:
        task.mount_routes(app, ctx)
    return app


def _lifespan(ctx: ServeContext, load_predictor: Callable):
    """Load the model and run the task's start hooks, then start the batcher; at shutdown, the reverse."""
    settings, state = ctx.settings, ctx.state

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        predict, labels, observe = await in_passing_thread(load_predictor)
        metrics = ServeMetrics(labels)
        request_log = RequestLog(log_url(settings.run_dir, settings.monitor_url), settings.retention_days, settings.log_text)
        state.update(predictor=getattr(load_predictor, "predictor", None), predict=predict, observe=observe,
                     metrics=metrics, log=request_log)

        def predict_observed(items: list) -> list[dict]:
            """Runs in the batch worker thread: model, metrics and request log, off the event loop."""
            t0 = time.perf_counter()
            results = state["predict"](items)
            metrics.batch.observe(len(items))
            ctx.record(items, results, (time.perf_counter() - t0) * 1000)
            return results

        for hook in ctx.start_hooks:
            await in_passing_thread(hook)  # e.g. a start-up check that generates: off the event loop
        batcher = MicroBatcher(predict_observed, settings.max_batch_size, settings.max_wait_ms)
        batcher.start()
        state.update(batcher=batcher, ready=True)
        yield
        state["ready"] = False
        await batcher.stop()
        for hook in ctx.stop_hooks:
            await run_in_threadpool(hook)
        request_log.close()

    return lifespan


async def in_passing_thread(fn: Callable[[], object]) -> object:
    """`fn()` in a thread of its own that ends with it. Loading the model and the start-up checks run torch ops; a
    thread that did keeps OpenMP worker threads for as long as it lives, and once a process holds more of them than it
    has cores libgomp stops spinning between ops and every op waits for its workers to wake. So only the thread that
    serves (the batcher's, or the generation engine's) may keep any. Measured on a 2-core EPYC with avx512_bf16:
    MiniLM at batch 1, 7.6 ms per call with the loading thread still alive, 3.9 ms without; SmolLM2's prefill and 4
    tokens, 232-292 ms against 145-161 ms."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuneforge-load") as passing:
        return await loop.run_in_executor(passing, fn)


def _measure_requests(app: FastAPI, state: dict) -> None:
    """Count and time each request to a route of the app (not any path a client makes up: the metrics stay bounded)."""
    app.add_middleware(RequestMetrics, app_routes=app, state=state)


class RequestMetrics:
    """ASGI middleware counting each response by route and status and timing it (to the response's start). Plain
    ASGI: Starlette's @app.middleware("http") runs every request through a task group and memory streams, about
    1 ms of a lone request's 10 (the serve bench at 1 client)."""

    def __init__(self, app, app_routes: FastAPI, state: dict):
        self.app, self.routes, self.state = app, app_routes, state
        self.known: set[str] = set()  # filled on the first request, when every route is registered

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        endpoint = scope["path"]

        async def measured_send(message):
            if message["type"] == "http.response.start":
                if not self.known:
                    self.known.update(r.path for r in self.routes.routes)
                if "metrics" in self.state and endpoint in self.known:
                    self.state["metrics"].requests.labels(endpoint, str(message["status"])).inc()
                    self.state["metrics"].latency.labels(endpoint).observe(time.perf_counter() - t0)
            await send(message)

        await self.app(scope, receive, measured_send)


def _mount_routes(app: FastAPI, ctx: ServeContext, reference: dict | None, inputs: PredictInputs) -> None:
    """/health, /ready, /metrics, /v1/predict and /v1/monitor."""
    settings, state = ctx.settings, ctx.state

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
        await run_in_threadpool(_update_drift_gauges, ctx, reference)  # a database query: off the event loop
        return Response(generate_latest(state["metrics"].registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/predict", dependencies=[Depends(ctx.authorise)], openapi_extra=json_body_openapi(inputs.request),
              responses={422: {"description": "invalid request, or a limit exceeded (named in `detail`)"}})
    async def predict(request: Request):
        body = parse_predict_request(await request.body(), inputs.request, request.headers.get("content-type", ""),
                                     inputs.upload)  # JSON whatever the Content-Type (curl -d), or the task's upload
        items = getattr(body, inputs.field)
        if not items:
            raise HTTPException(422, f"{inputs.field} is empty: send at least one")
        if len(items) > settings.max_texts:
            raise HTTPException(422, f"{len(items)} {inputs.field} is over the limit of {settings.max_texts} per request")
        refused = inputs.check(items, settings)
        if refused:
            raise HTTPException(422, refused)
        try:
            results = await asyncio.wait_for(state["batcher"].submit(items), settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"prediction took longer than {settings.request_timeout_s} s") from None
        return {"predictions": results}

    @app.get("/v1/monitor", dependencies=[Depends(ctx.authorise)])
    async def monitor():
        return await run_in_threadpool(_drift_now, ctx, reference)


def _drift_now(ctx: ServeContext, reference: dict | None) -> dict:
    """The drift report over the latest logged requests; each drifting signal is logged as a warning."""
    settings = ctx.settings
    rows = ctx.request_log.recent(settings.drift_window)
    report = drift_report(reference, rows, settings.drift_thresholds, settings.drift_min_rows)
    for name, sig in report["signals"].items():
        if sig["drift"]:
            log.warning("drift on %s: PSI %.3f > %.3f", name, sig["psi"], sig["threshold"])
    return report


def _update_drift_gauges(ctx: ServeContext, reference: dict | None) -> None:
    for name, sig in _drift_now(ctx, reference)["signals"].items():
        ctx.metrics.drift.labels(name).set(sig["psi"])
        ctx.metrics.drift_alarm.labels(name).set(1 if sig["drift"] else 0)


@dataclass
class RunPredictor:
    """Loads, at start-up, the predictor of the run's task (from the run's config.yaml; text classification for runs
    that predate the task field). Its `task` mounts any routes of its own; `predictor` is set once loaded."""
    run_dir: Path
    device: str | torch.device = "cpu"
    precision: str = "fp32"
    runtime: str = "torch"  # or onnx / onnx-int8: the run's ONNX export (export.RUNTIMES) on ONNX Runtime
    predictor: object = None

    @property
    def task(self):
        from tuneforge.artifacts import run_task_type
        from tuneforge.tasks.behaviour import get_task

        return get_task(run_task_type(self.run_dir))

    def __call__(self) -> tuple[Callable, list[str], Callable]:
        task = self.task
        if self.runtime == "torch":
            import torch

            from tuneforge.models.infer import hold_autocast_weights

            self.predictor = task.load_predictor(self.run_dir / "model", self.device, self.precision)
            model = getattr(self.predictor, "model", None)
            if isinstance(model, torch.nn.Module) and not hasattr(self.predictor, "cast_weights"):  # the LM casts its own
                hold_autocast_weights(model, self.predictor.precision)
        else:  # the task's predictor (tokenizer, labels, batching) with ONNX Runtime in place of the model
            from tuneforge.export import onnx_model_path
            from tuneforge.models.onnx import OnnxModel

            self.predictor = task.load_predictor(self.run_dir / "model", "cpu", "fp32")
            self.predictor.model = OnnxModel(onnx_model_path(self.run_dir, self.runtime), config=self.predictor.model.config)
        log.info("model on %s, %s, runtime %s", self.predictor.device, self.predictor.precision, self.runtime)
        return self.predictor.predict, task.label_names(self.predictor), task.observe


def run_predictor(run_dir: Path, device: str | torch.device = "cpu", precision: str = "fp32",
                  runtime: str = "torch") -> RunPredictor:
    return RunPredictor(Path(run_dir), device, precision, runtime)


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
