"""What the routes a task mounts get from the server (`task.mount_routes(app, ctx)`): the settings, the bearer-key
check, the metrics registry, the request log, start / stop hooks, and the strict JSON reading every route that parses
its own body uses. The server (serving/app.py) builds the context; this module imports nothing of it, so a task's
routes never import the app.
"""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import HTTPException, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel

from tuneforge.drift import DEFAULT_THRESHOLDS, NO_LABEL, logged_label
from tuneforge.serving.monitor import RequestLog


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
    options: dict = field(default_factory=dict)  # the run's task's own serve flags by key (its spec's serve_options)


# ------------------------------------------------------------------ request bodies

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


# ------------------------------------------------------------------ metrics and the context

class ServeMetrics:
    """The server's Prometheus metrics, in their own registry (a task adds its own metrics to `registry`)."""

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
    `record(inputs, results, latency_ms)`, which counts results and logs them as /v1/predict does. A start hook may
    replace `state["predict"]` (what /v1/predict calls) and add JSON to /ready under `state["info"]`."""
    settings: ServeSettings
    state: dict = field(default_factory=lambda: {"info": {}})
    start_hooks: list[Callable[[], None]] = field(default_factory=list)
    stop_hooks: list[Callable[[], None]] = field(default_factory=list)
    input_size: Callable[[object], int] = len  # the served task's measure of an input (request log, drift)
    measure_input: Callable[[object], dict] = lambda item: {}  # its other measures of an input (drift), by name

    async def authorise(self, request: Request) -> None:  # async: no thread-pool hop per request
        """A 401 unless the request carries the server's key as 'Authorization: Bearer KEY' (when it has one)."""
        if self.settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), self.settings.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                headers={"WWW-Authenticate": "Bearer"})

    def on_start(self, fn: Callable[[], None]) -> None:
        self.start_hooks.append(fn)

    def on_stop(self, fn: Callable[[], None]) -> None:
        self.stop_hooks.append(fn)

    @property
    def predictor(self):
        return self.state["predictor"]

    @property
    def metrics(self) -> ServeMetrics:
        return self.state["metrics"]

    @property
    def request_log(self) -> RequestLog:
        return self.state["log"]

    def record(self, inputs: list, results: list[dict], latency_ms: float) -> None:
        """Predicted labels and confidence into the metrics, and each result into the request log (any thread)."""
        decisions = [self.state["observe"](r) for r in results]
        for chosen, conf in decisions:
            for label in chosen or [NO_LABEL]:  # multi-label: each label counts, not each combination
                self.metrics.labels.labels(label).inc()
            self.metrics.confidence.observe(conf)
        self.request_log.write(inputs, [logged_label(c) for c, _ in decisions], [conf for _, conf in decisions], latency_ms,
                               sizes=[self.input_size(x) for x in inputs], measures=[self.measure_input(x) for x in inputs])
