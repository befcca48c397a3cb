"""Experiment tracking: a run's config, its training curve, its test results beside the baselines and its evidence,
sent to MLflow or TensorBoard as it goes (`tracking:` in the config, `--track mlflow|tensorboard` on run and tune;
off by default).

    tracker = open_tracker(cfg, out)          # checked before training: unreachable -> TrackingError (exit 2)
    tracker.start(name, params, tags)         # after the data is read and audited
    tracker.log_metrics(row, step)            # each evaluation
    tracker.log_artifacts({...}); tracker.end("FINISHED")

A tracker that fails mid-run loses no training: the failed call is dropped and named in `not_logged` (run.json's
`tracking`), and after MAX_FAILURES failures in a row it is not called again. `tuneforge tune` logs one parent run
and each trial as a run nested under it (MLflow's `mlflow.parentRunId` tag; pruned trials end KILLED, tagged
`tuneforge.trial_state: PRUNED`). Nothing here imports mlflow or tensorboard until a tracker of theirs is opened.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

from tuneforge.errors import TuneforgeError

MAX_FAILURES = 3  # failed calls in a row after which a tracker is left alone for the rest of the run
RUN_ID_FILE = "tracking.json"  # OUT/tracking.json: the tracker's run, so that --resume continues it


class TrackingError(TuneforgeError):
    """The tracker cannot be used: not installed, unreachable, or refusing the experiment (exit 2)."""


class Tracker:
    """No tracking: every call does nothing. The backends below override `_start`, `_log_metrics`, ... ;
    the public methods guard each call (see the module docstring)."""
    backend: str | None = None

    def __init__(self) -> None:
        self.not_logged: list[str] = []
        self.failures_in_a_row = 0
        self.run_id: str | None = None

    # --- guarded calls ---
    def _guard(self, what: str, fn, *args, **kwargs):
        if self.backend is None:
            return None
        if self.failures_in_a_row >= MAX_FAILURES:
            self.not_logged.append(f"{what} (the tracker had failed {MAX_FAILURES} times in a row: not tried)")
            return None
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # the tracker's own failure never stops the run
            self.failures_in_a_row += 1
            self.not_logged.append(f"{what}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300])
            return None
        self.failures_in_a_row = 0
        return result

    def start(self, name: str, params: dict, tags: dict, resume_id: str | None = None) -> None:
        self._guard("run start", self._start, name, params, tags, resume_id)

    def log_metrics(self, metrics: dict, step: int | None = None, what: str | None = None) -> None:
        """The numeric, finite values of `metrics` at `step`; `what` names them in not_logged (default: by step)."""
        values = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if values:
            self._guard(what or (f"metrics at step {step}" if step is not None else "metrics"), self._log_metrics,
                        values, step)

    def log_artifacts(self, paths: dict[str, Path]) -> None:
        """{artifact path in the run: a local file or directory}; each missing one is skipped."""
        for name, path in paths.items():
            if Path(path).exists():
                self._guard(f"artifact {name}", self._log_artifact, name, Path(path))

    def log_dict(self, name: str, content: dict) -> None:
        self._guard(f"artifact {name}", self._log_dict, name, content)

    def set_tags(self, tags: dict) -> None:
        self._guard("tags", self._set_tags, {k: str(v) for k, v in tags.items()})

    def register(self, artifact: str, name: str) -> dict | None:
        return self._guard(f"model registration as {name}", self._register, artifact, name)

    def nested(self, name: str, params: dict, tags: dict) -> "Tracker":
        """A run under this one (a search's trial); a no-op tracker when this one has no run."""
        if self.backend is None or self.run_id is None:
            return Tracker()
        child = self._child()
        child.start(name, params, tags)
        return child

    def end(self, status: str = "FINISHED") -> None:
        self._guard(f"run end ({status})", self._end, status)

    def record(self) -> dict | None:
        """What run.json keeps: backend, where, the run, and what was not logged."""
        if self.backend is None:
            return None
        return {"backend": self.backend, **self._where(), "run_id": self.run_id, "not_logged": list(self.not_logged)}

    # --- the backends' part ---
    def _start(self, name, params, tags, resume_id): ...
    def _log_metrics(self, values, step): ...
    def _log_artifact(self, name, path): ...
    def _log_dict(self, name, content): ...
    def _set_tags(self, tags): ...
    def _register(self, artifact, name): ...
    def _child(self) -> "Tracker": return Tracker()
    def _end(self, status): ...
    def _where(self) -> dict: return {}


# ----------------------------------------------------------------------------------------------------- MLflow


@contextmanager
def _quick_http():
    """MLflow's REST client retries a refused connection 7 times with backoff (minutes): the reachability check
    asks once, with a short timeout."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class MlflowTracker(Tracker):
    backend = "mlflow"
    PARAMS_PER_CALL = 100  # MLflow's log_batch limit

    def __init__(self, client, uri: str, experiment_id: str, experiment: str, parent: str | None = None) -> None:
        super().__init__()
        self.client, self.uri, self.experiment_id, self.experiment, self.parent = client, uri, experiment_id, experiment, parent

    @classmethod
    def open(cls, uri: str | None, experiment: str) -> "MlflowTracker":
        try:
            import mlflow
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise TrackingError("tracking.backend mlflow needs the mlflow package, which is not installed",
                                fix="pip install 'tuneforge[tracking]' (or pip install mlflow), or drop --track") from None
        # a mid-run outage costs a few seconds per call, not minutes (the user's own settings win)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        uri = uri or mlflow.get_tracking_uri()  # null: MLflow's own default (sqlite:///mlflow.db here)
        shown = _redact(uri)
        try:
            with _quick_http():
                client = MlflowClient(tracking_uri=uri, registry_uri=uri)
                found = client.get_experiment_by_name(experiment)
                if found is not None and found.lifecycle_stage == "deleted":
                    raise TrackingError(f"MLflow experiment {experiment!r} at {shown} was deleted",
                                        fix="restore it (mlflow experiments restore), or set tracking.experiment to another name")
                experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
        except TrackingError:
            raise
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            server = uri.startswith(("http://", "https://"))
            raise TrackingError(f"the MLflow tracker at {shown} cannot be reached or refused experiment {experiment!r}: "
                                f"{first[:800]}",
                                fix=("start the server (mlflow server --host 127.0.0.1 --port 5000) or correct tracking.uri"
                                     if server else "correct tracking.uri as MLflow's message says")
                                    + "; nothing was trained") from None
        return cls(client, uri, experiment_id, experiment)

    def _start(self, name, params, tags, resume_id):
        from mlflow.entities import Param, RunTag

        if resume_id is not None:
            self.client.update_run(resume_id, status="RUNNING")
            self.run_id = resume_id
            return
        all_tags = dict(tags) | ({"mlflow.parentRunId": self.parent} if self.parent else {})
        run = self.client.create_run(self.experiment_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()})
        self.run_id = run.info.run_id
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), self.PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[i:i + self.PARAMS_PER_CALL])

    def _log_metrics(self, values, step):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step or 0) for k, v in values.items()])

    def _log_artifact(self, name, path):
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), name)
        else:
            parent = str(Path(name).parent)
            self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent)

    def _log_dict(self, name, content):
        self.client.log_dict(self.run_id, content, name)

    def _set_tags(self, tags):
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _register(self, artifact, name):
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description="tuneforge runs the evaluation gate promoted")
        version = self.client.create_model_version(name, source=f"runs:/{self.run_id}/{artifact}", run_id=self.run_id,
                                                   tags={"promoted": "true"})
        return {"name": name, "version": str(version.version)}

    def _child(self):
        return MlflowTracker(self.client, self.uri, self.experiment_id, self.experiment, parent=self.run_id)

    def _end(self, status):
        self.client.set_terminated(self.run_id, status=status)

    def _where(self):
        url = None
        if self.uri.startswith(("http://", "https://")) and self.run_id:
            url = f"{_redact(self.uri).rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return {"uri": _redact(self.uri), "experiment": self.experiment, "experiment_id": self.experiment_id, "url": url}


def _param_value(v) -> str:
    text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return text if len(text) <= 6000 else text[:5997] + "..."  # MLflow's limit on a param's value


def _redact(uri: str) -> str:
    """The URI without a password (postgresql://user:SECRET@host, https://user:SECRET@host)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password:
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    return uri


# ------------------------------------------------------------------------------------------------ TensorBoard


class TensorBoardTracker(Tracker):
    """Event files under OUT/tensorboard/ (a search's trials in OUT/tensorboard/trial-N/): `tensorboard --logdir`."""
    backend = "tensorboard"

    def __init__(self, log_dir: Path) -> None:
        super().__init__()
        self.log_dir, self.writer, self.n_children = log_dir, None, 0

    @classmethod
    def open(cls, log_dir: Path) -> "TensorBoardTracker":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise TrackingError("tracking.backend tensorboard needs the tensorboard package, which is not installed",
                                fix="pip install 'tuneforge[tracking]' (or pip install tensorboard), or drop --track") from None
        return cls(log_dir)

    def _start(self, name, params, tags, resume_id):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.run_id = str(self.log_dir)
        table = "\n".join(f"| {k} | {_param_value(v)} |" for k, v in {**tags, **params}.items())
        self.writer.add_text("config", f"| key | value |\n|---|---|\n{table}", 0)

    def _log_metrics(self, values, step):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step or 0)
        self.writer.flush()

    def _log_artifact(self, name, path): ...  # TensorBoard keeps scalars and text, not files: the files stay in OUT

    def _log_dict(self, name, content): ...

    def _set_tags(self, tags):
        self.writer.add_text("tags", "\n".join(f"- {k}: {v}" for k, v in tags.items()), 0)

    def _register(self, artifact, name): ...

    def _child(self):
        self.n_children += 1
        return TensorBoardTracker(self.log_dir / f"run-{self.n_children}")

    def _end(self, status):
        self.writer.add_text("status", status, 0)
        self.writer.close()

    def _where(self):
        return {"log_dir": str(self.log_dir)}


# ------------------------------------------------------------------------------------------ what a run sends


def open_tracker(cfg, out: Path) -> Tracker:
    """The config's tracker, checked usable now (TrackingError, exit 2, before anything is trained), or a no-op."""
    t = cfg.tracking
    if t.backend is None:
        return Tracker()
    if t.backend == "tensorboard":
        return TensorBoardTracker.open(out / "tensorboard")
    return MlflowTracker.open(t.uri, t.experiment or out.resolve().name)


def kept_run_id(out: Path, tracker: Tracker) -> str | None:
    """The run an interrupted run started in the same tracker (OUT/tracking.json), for --resume to continue."""
    path = out / RUN_ID_FILE
    if tracker.backend is None or not path.is_file():
        return None
    kept = json.loads(path.read_text())
    return kept.get("run_id") if kept.get("backend") == tracker.backend and kept.get("where") == tracker._where() \
        .get("uri", tracker._where().get("log_dir")) else None


def run_id_record(tracker: Tracker) -> dict:
    where = tracker._where()
    return {"backend": tracker.backend, "where": where.get("uri", where.get("log_dir")), "run_id": tracker.run_id}


def flat_params(cfg) -> dict:
    """The resolved config as dotted keys (task.type, train.learning_rate, ...); the tracking section left out."""
    def walk(prefix: str, value, into: dict) -> dict:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v, into)
        else:
            into[prefix] = value
        return into

    return walk("", cfg.model_dump(exclude={"tracking"}), {})


def run_tags(cfg, task_name: str, data_report: dict, model_info: dict | None = None) -> dict:
    """Task, model, the data's and the test split's content hashes, versions and the hardware."""
    from tuneforge import artifacts

    import hashlib

    splits = {k: v["sha256"] for k, v in data_report["splits"].items()}
    versions = artifacts.library_versions()
    hw = artifacts.hardware()
    tags = {"tuneforge.task": task_name, "tuneforge.model": cfg.model.name,
            "tuneforge.data_sha256": hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest(),
            "tuneforge.test_sha256": splits.get("test", ""), "tuneforge.version": versions.get("tuneforge", ""),
            "tuneforge.torch": versions.get("torch", ""),
            "tuneforge.hardware": ", ".join(hw.get("gpus", [])) or hw.get("cpu", ""),
            "tuneforge.output": str(Path(cfg.output.dir).resolve())}
    if model_info:
        tags["tuneforge.architecture"] = model_info.get("architecture", "")
    return {k: str(v) for k, v in tags.items()}


def eval_metrics(row: dict) -> dict:
    """An evaluation's row as step metrics: training loss, validation metrics, learning rate, throughput."""
    return {k: v for k, v in row.items() if k not in ("step", "epoch")}


def final_metrics(metrics: dict) -> dict:
    """metrics.json as flat metrics: test_<metric> of the model, baseline.<name>.<metric> of each baseline,
    promoted (1/0), beats_baselines, the cost estimated beside the actual."""
    flat = {}
    test = metrics.get("test") or {}
    for k, v in (test.get("model") or {}).items():
        flat[f"test_{k}"] = v
    for name, scores in (test.get("baselines") or {}).items():
        for k, v in (scores or {}).items():
            flat[f"baseline.{name}.{k}"] = v
    flat["promoted"] = int(bool(metrics.get("promoted")))
    flat["beats_baselines"] = int(bool(metrics.get("beats_baselines")))
    cost = metrics.get("cost") or {}
    est, actual = cost.get("estimated") or {}, cost.get("actual") or {}
    est = est.get("corrected") or est
    for key in ("seconds_total", "seconds_train", "peak_memory_bytes"):
        if key in est:
            flat[f"cost.estimated.{key}"] = est[key]
        if key in actual:
            flat[f"cost.actual.{key}"] = actual[key]
    return flat
