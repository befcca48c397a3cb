"""The one place the stages are wired: prepare (data, audit, tokens) -> fit (baselines, train) -> finalize
(export, test evaluation, artifacts). A search prepares once and fits once per trial.

    tuneforge run examples/sentiment.yaml
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tuneforge import artifacts, tracking
from tuneforge.config import RunConfig, dump_config, parse_config
from tuneforge.errors import OutputError
from tuneforge.drift import PROFILE_FILE
from tuneforge.evaluation.gate import judge
from tuneforge.tasks import get_spec


@contextmanager
def _stage(durations: dict, name: str):
    t0 = time.perf_counter()
    yield
    durations[name] = round(time.perf_counter() - t0, 2)


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _check_resume_config(out: Path, cfg: RunConfig) -> None:
    saved_path = out / "config.yaml"
    import yaml

    saved = parse_config(yaml.safe_load(saved_path.read_text()), str(saved_path))
    # where the output and the tracker go is not the run: a resume may change them
    mine, theirs = cfg.model_dump(exclude={"output", "tracking"}), saved.model_dump(exclude={"output", "tracking"})
    if mine != theirs:
        diff = [k for k in mine if mine[k] != theirs[k]]
        raise OutputError(f"the config differs from the interrupted run's in section(s) {', '.join(diff)}",
                          fix=f"resume with the same config (saved in {saved_path}), or start over with --overwrite")


@dataclass
class Prepared:
    """What every training of the same data shares (a run, or each trial of a search): the data read, cleaned,
    audited, split and tokenised once, the model found, the baselines scored once."""
    cfg: RunConfig
    task: object
    data: object
    model_dir: Path
    conversion: dict | None
    tokenizer: object
    label_space: object  # the task's label space: classes, entity types, or the LM's prompt format
    audit: dict
    max_length: int
    max_length_why: str
    ids: dict
    y: dict
    console: Console
    durations: dict = field(default_factory=dict)
    t_start: float = field(default_factory=time.perf_counter)
    baselines: dict | None = None
    resume_from: str = "new"  # new | checkpoint | start | nothing (artifacts.resume_point)


@dataclass
class Fitted:
    """One training: the trained model (best validation weights), the loop's result and the plan it followed."""
    model: object
    result: object
    estimate: dict
    plan: dict
    select: tuple[str, str]
    info: dict
    weights_held: float = 1.0  # the share of the model's weights each process held in training (FSDP: about 1/N)


def run(cfg: RunConfig, *, resume: bool = False, console: Console | None = None) -> dict:
    """Run the whole job; returns the content of metrics.json. Raises TuneforgeError on bad input."""
    # under torchrun (`--nproc N`) every process runs this; only rank 0 reads the data, talks and writes
    from tuneforge.runlog import make_console

    console = console or make_console(quiet=int(os.environ.get("RANK", "0")) != 0)
    out = Path(cfg.output.dir)
    t_start = time.perf_counter()
    tracker = tracking.Tracker()

    def checked_prepare() -> Prepared:
        # --- everything that can reject the input happens before the output directory is touched ---
        nonlocal tracker
        tracker = tracking.open_tracker(cfg, out)  # an unreachable tracker stops the run here (exit 2)
        artifacts.check_output_dir(out, resume=resume, overwrite=cfg.output.overwrite)
        point = artifacts.resume_point(out) if resume else "new"
        if point in ("checkpoint", "start"):
            _check_resume_config(out, cfg)
        prep = prepare(cfg, console, kept=_kept_preparation(out) if point in ("checkpoint", "start") else None)
        prep.resume_from = point
        if point in ("checkpoint", "start"):
            prep.baselines = _kept_baselines(out, prep)
        return prep

    prep, accelerator, precision, why = prepare_with_accelerator(cfg, console, checked_prepare)
    prep.t_start = t_start
    if prep.resume_from == "nothing":
        console.print(f"[bold]resume[/] nothing was kept in {out} (the run stopped before its data was audited): "
                      "starting from the beginning")
    elif prep.resume_from == "start":
        console.print("[bold]resume[/] the run stopped before its first checkpoint: training starts over; the data, "
                      f"audit{' and baselines' if prep.baselines is not None else ''} already done are kept")
    if prep.resume_from in ("new", "nothing") and accelerator.is_main_process:  # under torchrun, one process writes
        artifacts.reset_output_dir(out)
        artifacts.write_text(out / "config.yaml", dump_config(cfg))  # the resolved config; --resume checks against it
        artifacts.write_json(out / "audit.json", prep.audit)
        artifacts.write_json(out / artifacts.PREPARED, {"splits": _split_hashes(prep.data.report),
                                                        "max_length": prep.max_length, "max_length_why": prep.max_length_why})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        start_tracking(tracker, prep, cfg, out, resume_id=tracking.kept_run_id(out, tracker)
                       if prep.resume_from in ("checkpoint", "start") else None)
    with tracking_ended_on_error(tracker):
        fitted = fit(prep, cfg, accelerator, precision, why, out=out, resume=prep.resume_from == "checkpoint",
                     keep_baselines=True, track=tracker)
        if not accelerator.is_main_process:
            return {}
        return finalize(prep, cfg, fitted, accelerator, precision, out=out, resume=resume, tracker=tracker)


def start_tracking(tracker: tracking.Tracker, prep: Prepared, cfg: RunConfig, out: Path, *, name: str | None = None,
                   resume_id: str | None = None, tags: dict | None = None) -> None:
    """Start the tracker's run (params: the resolved config; tags: task, model, data hashes, versions, hardware) and
    note it in OUT/tracking.json for a --resume to continue."""
    if tracker.backend is None:
        return
    tracker.start(name or out.resolve().name, tracking.flat_params(cfg),
                  tracking.run_tags(cfg, prep.task.name, prep.data.report) | (tags or {}), resume_id=resume_id)
    if tracker.run_id:
        artifacts.write_json(out / tracking.RUN_ID_FILE, tracking.run_id_record(tracker))
        where = tracker.record()
        prep.console.print(f"[bold]tracking[/] {tracker.backend} run {tracker.run_id}"
                           + (f" in {where['uri']} (experiment {where['experiment']})" if "uri" in where else ""))


@contextmanager
def tracking_ended_on_error(tracker: tracking.Tracker):
    """A run that stops with an error ends its tracked run FAILED (KILLED when interrupted)."""
    from tuneforge.training.loop import TrainingInterrupted

    try:
        yield
    except BaseException as err:
        tracker.end("KILLED" if isinstance(err, (KeyboardInterrupt, TrainingInterrupted)) else "FAILED")
        raise


def _split_hashes(report: dict) -> dict[str, str]:
    return {name: split["sha256"] for name, split in report["splits"].items()}


def _kept_preparation(out: Path) -> dict | None:
    """What the interrupted run's data stage settled (prepared.json) and its audit (audit.json), or None (a run from
    before prepared.json: the audit runs again)."""
    import json

    if not (out / artifacts.PREPARED).is_file() or not (out / "audit.json").is_file():
        return None
    return {**json.loads((out / artifacts.PREPARED).read_text()), "audit": json.loads((out / "audit.json").read_text())}


def _kept_baselines(out: Path, prep: Prepared) -> dict | None:
    """The baselines' test outputs the interrupted run scored (baselines.json), when they were scored on these splits."""
    import json

    path = out / artifacts.BASELINES
    if not path.is_file():
        return None
    kept = json.loads(path.read_text())
    if kept.get("splits") != _split_hashes(prep.data.report) or kept.get("names") != list(prep.cfg.eval.baselines):
        return None
    return artifacts.from_json(kept["baselines"])


def prepare(cfg: RunConfig, console: Console, kept: dict | None = None) -> Prepared:
    """Data, model reference, tokenizer, audit (stops on a blocking finding) and encoding: nothing is written.
    `kept`: what an interrupted run settled (its split hashes, max_length and audit): the data must give the same
    splits, and the audit is not run again."""
    from tuneforge.errors import OutputError
    from tuneforge.models.resolve import check_model_files
    from tuneforge.tasks.behaviour import get_task

    durations: dict[str, float] = {}
    task = get_task(cfg.task.type)
    with _stage(durations, "data"):
        data = task.prepare(cfg)
    splits = data.splits
    with _stage(durations, "model_convert"):
        model_dir, conversion = task.resolve_model(cfg.model.name)
    for note in check_model_files(model_dir, cfg.model.trust_remote_code):
        console.print(f"[bold]model[/] {note}")
    if conversion and not conversion.get("cached"):
        console.print(f"[bold]model[/] converted {conversion['source']} to safetensors in {conversion['seconds']:.1f} s "
                      f"(cached in {model_dir}; later runs reuse it)")
    tokenizer = task.load_tokenizer(model_dir)
    label_space = task.label_space(cfg, data)
    if kept is not None:
        changed = [name for name, h in _split_hashes(data.report).items() if kept["splits"].get(name) != h]
        if changed:
            raise OutputError(f"the data changed since the interrupted run: its {', '.join(changed)} split differs "
                              f"(content hash), so its checkpoint and baselines no longer apply",
                              fix="resume with the data the run started with, or start over with --overwrite")
        audit_report, max_length, max_length_why = kept["audit"], kept["max_length"], kept["max_length_why"]
        console.print(f"[bold]audit[/] kept from the interrupted run ({cfg.output.dir}/audit.json)")
    else:
        with _stage(durations, "audit"):
            audit_report, max_length, max_length_why = audit_data(cfg, task, data, tokenizer, model_dir, console)
    check_audit(audit_report)
    console.print(f"[bold]data[/] {len(splits.train)} train / {len(splits.val)} validation / {len(splits.test)} test rows, "
                  f"{task.describe_space(label_space)}; {_groups_phrase(data.report)}; removed "
                  f"{sum(data.report['removed_counts'].values())} rows {data.report['removed_counts'] or ''}"
                  + _decontamination_phrase(data.report))
    with _stage(durations, "tokenize"):
        ids, y = task.encode(cfg, tokenizer, label_space, splits, max_length)
    return Prepared(cfg, task, data, model_dir, conversion, tokenizer, label_space, audit_report, max_length, max_length_why,
                    ids, y, console, durations)


def prepare_with_accelerator(cfg: RunConfig, console: Console, make) -> tuple[Prepared, object, str, str]:
    """(prepared data, accelerator, precision, why) for `run` and `tune`: under torchrun the process group comes first
    and `make()` runs on rank 0 only (prepare_shared); in one process the data is prepared before the accelerator."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        accelerator, precision, why = make_accelerator(cfg)
        return prepare_shared(cfg, console, accelerator, make), accelerator, precision, why
    prep = make()
    return (prep, *make_accelerator(cfg))


def prepare_shared(cfg: RunConfig, console: Console, accelerator, make=None) -> Prepared:
    """`make()` (default: prepare) on rank 0 only, its result sent to the other processes: the data is read, audited
    and tokenised once. The others load the tokenizer themselves (from model_dir: cheap) and get no near-duplicate
    graph (only the audit reads it). An error on rank 0 is raised on every process (rank 0 alone prints it)."""
    import dataclasses

    from tuneforge.errors import TuneforgeError
    from tuneforge.tasks.behaviour import get_task
    from tuneforge.training.distributed import broadcast_from_main, error_payload, raise_shared

    make = make or (lambda: prepare(cfg, console))
    payload = None
    if accelerator.is_main_process:
        try:
            prep = make()
        except TuneforgeError as err:
            broadcast_from_main(accelerator, error_payload(err))
            raise
        payload = {f.name: getattr(prep, f.name) for f in dataclasses.fields(Prepared)
                   if f.name not in ("cfg", "task", "tokenizer", "console", "t_start")}
        if dataclasses.is_dataclass(prep.data) and hasattr(prep.data, "duplicates"):
            payload["data"] = dataclasses.replace(prep.data, duplicates=None)
    payload = broadcast_from_main(accelerator, payload)
    raise_shared(payload)
    if accelerator.is_main_process:
        return prep
    task = get_task(cfg.task.type)
    return Prepared(cfg=cfg, task=task, tokenizer=task.load_tokenizer(payload["model_dir"]), console=console, **payload)


def make_accelerator(cfg: RunConfig):
    """(Accelerator, precision, why) for this hardware, train.precision and train.distributed. Under torchrun
    Accelerate starts the process group: gloo on CPU, NCCL on GPUs."""
    from accelerate import Accelerator

    from tuneforge.models.device import resolve_device, resolve_precision
    from tuneforge.training.distributed import accelerator_kwargs, check_processes, shard_cpu_processes

    device = resolve_device("auto")
    precision, why = resolve_precision(cfg.train.precision, device)
    kwargs = accelerator_kwargs(cfg.train.distributed, device)
    from accelerate.state import AcceleratorState

    # Accelerate keeps one mixed-precision state per process and refuses a second Accelerator with another
    # precision: runs one after another in one process (a search's trials, a notebook, the tests) start afresh;
    # the distributed state (the process group) is kept
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=device.type == "cpu", **kwargs)
    shard_cpu_processes(accelerator, cfg.train.distributed, precision)
    check_processes(cfg.train.batch_size, accelerator.num_processes, device)
    return accelerator, precision, why


def fit(prep: Prepared, cfg: RunConfig, accelerator, precision: str, why: str, *, out: Path, resume: bool = False,
        progress=None, estimate: bool = True, keep_baselines: bool = False, track: tracking.Tracker | None = None) -> Fitted:
    """Load the pre-trained model, score the baselines on it (once per Prepared), apply the method, estimate the
    cost and train with `cfg.train` (a search's trial passes its own). `progress(step, total, row)` is called at
    every step and evaluation (default: the progress bar). `estimate=False` (a search's trials: seconds each)
    leaves Fitted.estimate None; `estimate_cost` makes it later for the one that is kept. `keep_baselines` writes
    the baselines' outputs to OUT/baselines.json as soon as they are scored, for a --resume to reuse. `track`: each
    evaluation's row also goes to this tracker (training loss, validation metrics, learning rate, throughput)."""
    from tuneforge.models.infer import pad_id_of
    from tuneforge.models.load import apply_method
    from tuneforge.models.resolve import describe
    from tuneforge.training.distributed import weights_held
    from tuneforge.training.loop import TrainData, default_loss, epochs_for, patience_for, plan_steps, train

    task, console, durations, ids, y = prep.task, prep.console, prep.durations, prep.ids, prep.y
    trained = _trained_baselines(prep, cfg, accelerator, precision, why, out) if prep.baselines is None else {}
    with _stage(durations, "load_model"):
        model = task.load_model(prep.model_dir, prep.label_space, cfg.train.seed, cfg.model.trust_remote_code)
    info = describe(prep.model_dir)
    method = cfg.train.method
    if method == "frozen" and info["layers"]:
        n = info["layers"] // 2 if cfg.train.frozen_layers is None else cfg.train.frozen_layers
        method += f" (embeddings + {n} of {info['layers']} layers fixed)"
    console.print(f"[bold]model[/] {cfg.model.name} ({info['architecture']}, {info['parameters'] / 1e6:.1f}M parameters) "
                  f"from {prep.model_dir}; method {method}; lr {cfg.train.learning_rate:g}; precision {precision} ({why})")
    pad_id = pad_id_of(prep.tokenizer)
    model.to(accelerator.device)

    # --- baselines, before any weight changes (a probe may use the pre-trained encoder) ---
    if prep.baselines is None:
        with _stage(durations, "baselines"):  # one process scores the test split, so only it needs them
            prep.baselines = task.baselines(cfg, prep.label_space, prep.data.splits, ids, y, model, pad_id, precision) \
                | trained if accelerator.is_main_process else {}
        if keep_baselines and accelerator.is_main_process:
            artifacts.write_json(out / artifacts.BASELINES, {"splits": _split_hashes(prep.data.report),
                                                             "names": list(cfg.eval.baselines),
                                                             "baselines": artifacts.to_json(prep.baselines)})

    with _stage(durations, "before_training"):  # e.g. preference tuning's reference log-probs
        task.before_training(cfg, prep.label_space, ids, y, model, pad_id, precision)
    model = apply_method(model, cfg.train, task.peft_task_type, task.lora_targets(), task.lora_head())
    loss_fn = task.training_loss(cfg) or default_loss
    train_data = TrainData(ids["train"], y["train"], getattr(y["train"], "positions", None))
    world = accelerator.num_processes
    per_epoch, total, eval_every = plan_steps(len(ids["train"]), cfg.train)  # the same for any number of processes
    epochs = epochs_for(len(ids["train"]), cfg.train)
    patience = patience_for(cfg.train, per_epoch, eval_every)
    est = _estimate(prep, cfg, model, precision, world) if estimate else None
    epochs_why = "train.epochs" if cfg.train.epochs is not None else \
        f"by data size: ~{cfg.train.target_steps} steps, at most {cfg.train.max_auto_epochs:g} epochs"
    split = "" if world == 1 else (f" (each batch split across {world} processes, {cfg.train.distributed.strategy}: "
                                   f"{-(-cfg.train.batch_size // world)} rows or fewer each)")
    console.print(f"[bold]plan[/] {epochs:g} epochs ({epochs_why}) = {total} steps of {cfg.train.batch_size}x{cfg.train.grad_accum}{split}, "
                  f"validation every {eval_every} steps, early stopping after {patience or 'no'} evaluations without gain; "
                  f"max_length {prep.max_length} ({prep.max_length_why})")
    if est is not None:
        console.print(f"[bold]estimate[/] whole run {_fmt_s(est['seconds_total'])}: spent so far {_fmt_s(est['seconds_so_far'])} "
                      f"(data, audit, baselines) + training {_fmt_s(est['seconds_train'])} + evaluation {_fmt_s(est['seconds_eval'])} "
                      f"+ export and report {_fmt_s(est['seconds_export_and_report'])} ({est['trainable_parameters'] / 1e6:.1f}M trainable); "
                      f"peak memory ~{est['peak_memory_bytes'] / 2**30:.1f} GiB on {est['device']}")

    # --- train ---
    validate = task.validator(cfg, prep.label_space, prep.tokenizer, prep.max_length, ids["val"], y["val"], pad_id, precision)
    select = task.selection(cfg)
    from tuneforge.training.cost import EstimateCheck

    check = EstimateCheck(est, total, max(1, total // eval_every), console.print) if est is not None and not resume else None
    with _stage(durations, "train"), (contextlib.nullcontext(progress) if progress else _progress(console)) as report:
        if track is not None and track.backend is not None:
            report = _tracked(report, track)
        result = train(model, train_data, validate, cfg.train, cfg.eval,
                       accelerator=accelerator, precision=precision, pad_id=pad_id,
                       checkpoint_dir=out / artifacts.CHECKPOINT, resume=resume, progress=report,
                       loss_fn=loss_fn, select=select, monitor=check, collate=task.collate)
    from tuneforge.training.cost import utilisation

    util = utilisation(est, result.tokens, result.train_seconds)
    unit = get_spec(task.name).positions
    rates = ([f"{result.tokens / max(result.train_seconds, 1e-9):.0f} {unit}/s"] if unit else []) + (
        [f"{util['achieved_flops_per_second'] / 1e9:.0f} GFLOP/s = {util['share_of_peak']:.0%} of this "
         f"{est['device'].upper()}'s {precision} matmul peak, {util['peak_flops_per_second'] / 1e9:.0f} GFLOP/s"]
        if util and util["share_of_peak"] is not None else [])
    console.print(f"[bold]trained[/] {result.steps} steps, {result.samples_per_second:.1f} rows/s"
                  + (f" ({', '.join(rates)})" if rates else "") + "; best validation "
                  f"{select[0].removeprefix('val_')} {result.best_metric:.4f} at step {result.best_step}"
                  + (" (stopped early)" if result.stopped_early else ""))
    plan = {"train.epochs": epochs, "model.max_length": prep.max_length, "total_steps": total, "eval_every": eval_every,
            "train.early_stopping_patience": patience, "processes": world}
    held = weights_held(model)
    return Fitted(_trained_model(prep, cfg, accelerator, model), result, est, plan, select, info, held)


def _tracked(progress, tracker: tracking.Tracker):
    """`progress` that also sends each evaluation's row to the tracker (before `progress` may stop the training)."""
    def update(step: int, total: int, row: dict | None) -> None:
        if row is not None:
            tracker.log_metrics(tracking.eval_metrics(row), step)
        progress(step, total, row)

    return update


def _trained_baselines(prep: Prepared, cfg: RunConfig, accelerator, precision: str, why: str, out: Path) -> dict:
    """The task's baselines that are trainings themselves (e.g. SFT on preference pairs' chosen answers): each trained
    here on its variant of the data, with cfg.train and the task's hooks, before the run's own model is loaded (one
    model in memory at a time), then scored by the task on the main process. Their checkpoints go to a scratch
    directory removed afterwards."""
    import dataclasses

    scored = {}
    for name, (space, ids, y) in prep.task.trained_baselines(cfg, prep.label_space, prep.ids, prep.y,
                                                             prep.max_length).items():
        prep.console.print(f"[bold]baseline[/] {name}: trained first, with the same train settings")
        sub = dataclasses.replace(prep, label_space=space, ids=ids, y=y, baselines={}, durations={}, resume_from="new")
        scratch = out / "baselines.tmp" / name
        try:
            with _stage(prep.durations, f"baseline_{name}"):
                fitted = fit(sub, cfg, accelerator, precision, why, out=scratch)
                if accelerator.is_main_process:
                    from tuneforge.models.infer import pad_id_of

                    scored[name] = prep.task.score_trained_baseline(cfg, name, prep.label_space, prep.data.splits, prep.y,
                                                                    fitted.model, pad_id_of(prep.tokenizer))
        finally:
            accelerator.wait_for_everyone()
            accelerator.free_memory()  # the accelerator keeps every prepared model otherwise
            if accelerator.is_main_process:
                shutil.rmtree(out / "baselines.tmp", ignore_errors=True)
    return scored


def _estimate(prep: Prepared, cfg: RunConfig, model, precision: str, world: int) -> dict:
    """The run's cost on this hardware, from a few timed steps of `model` (cost.estimate)."""
    from tuneforge.models.infer import pad_id_of
    from tuneforge.training import cost
    from tuneforge.training.loop import default_loss, plan_steps

    ids, y = prep.ids, prep.y
    _, total, eval_every = plan_steps(len(ids["train"]), cfg.train)
    with _stage(prep.durations, "estimate"):
        return cost.estimate(model, ids["train"], y["train"], batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                             group_by_length=cfg.train.group_by_length, total_steps=total, grad_accum=cfg.train.grad_accum,
                             eval_rows_tokens=sum(map(len, ids["val"])), n_evals=max(1, total // eval_every),
                             infer_tokens=sum(map(len, ids["test"])), pad_id=pad_id_of(prep.tokenizer), precision=precision,
                             seconds_so_far=time.perf_counter() - prep.t_start, positions=getattr(y["train"], "positions", None),
                             loss_fn=prep.task.training_loss(cfg) or default_loss, world=world, collate=prep.task.collate)


def estimate_cost(prep: Prepared, cfg: RunConfig, accelerator, precision: str) -> dict:
    """The estimate `fit` makes, for a model trained without one (a search's kept trial): timed on a fresh copy of
    the pre-trained model with the config's method, on the accelerator's device (the weights do not change it)."""
    from tuneforge.models.load import apply_method

    model = prep.task.load_model(prep.model_dir, prep.label_space, cfg.train.seed, cfg.model.trust_remote_code)
    model = apply_method(model, cfg.train, prep.task.peft_task_type, prep.task.lora_targets(),
                         prep.task.lora_head()).to(accelerator.device)
    try:
        return _estimate(prep, cfg, model, precision, accelerator.num_processes)
    finally:
        del model


def _trained_model(prep: Prepared, cfg: RunConfig, accelerator, model):
    """The trained model as one piece, for export: FSDP gathers the full weights from the shards onto rank 0 (every
    process takes part) and loads them into a fresh copy of the model; the other processes get None."""
    from tuneforge.training.distributed import full_state_dict, is_sharded

    if not is_sharded(accelerator):
        return accelerator.unwrap_model(model)
    from tuneforge.models.load import apply_method

    state = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    whole = apply_method(prep.task.load_model(prep.model_dir, prep.label_space, cfg.train.seed, cfg.model.trust_remote_code),
                         cfg.train, prep.task.peft_task_type, prep.task.lora_targets(), prep.task.lora_head())
    whole.load_state_dict(state)
    return whole.eval()


def finalize(prep: Prepared, cfg: RunConfig, fitted: Fitted, accelerator, precision: str, *, out: Path,
             resume: bool = False, extra_metrics: dict | None = None, tracker: tracking.Tracker | None = None) -> dict:
    """Export the trained model, evaluate the export on the test split (the only time test labels are read), and
    write metrics, reports and run.json (last: its presence marks a finished run). Returns metrics.json's content."""
    from tuneforge.evaluation.card import build_card
    from tuneforge.evaluation.report import build_report
    from tuneforge.models.load import export_adapter, export_model
    from tuneforge.training import cost

    task, durations, splits, label_space = prep.task, prep.durations, prep.data.splits, prep.label_space
    result, est, trained = fitted.result, fitted.estimate, fitted.model
    # --- export, then evaluate the exported model exactly as a user will load it ---
    with _stage(durations, "export"):
        with artifacts.staged_dir(out / "model") as staging:  # model/ appears whole, or not at all
            export_model(trained, prep.tokenizer, staging)
            _record_settings(staging, task.settings(cfg, prep.max_length, label_space))
            task.export(cfg, staging, prep.tokenizer, label_space)
        if cfg.output.keep_adapter:
            try:
                with artifacts.writing(out / "adapter"):
                    export_adapter(trained, out / "adapter")  # staged in adapter.tmp and renamed
            finally:
                shutil.rmtree(out / "adapter.tmp", ignore_errors=True)
    with _stage(durations, "evaluate"):
        predictor = task.load_predictor(out / "model", device=accelerator.device)  # fp32: the metrics a user's load gives
        metrics, test_outputs = task.evaluate(cfg, label_space, splits, prep.y, predictor, prep.baselines)
        judge(metrics, cfg, get_spec(cfg.task.type).direction(metrics["main_metric"]))
        clean = _test_without_training_copies(prep, cfg, predictor)
        if clean is not None:
            metrics["test_without_training_copies"] = clean
        artifacts.write_json(out / "model" / PROFILE_FILE, task.reference_profile(predictor, splits.test.texts, test_outputs))
    metrics["validation"] = {"metric": fitted.select[0].removeprefix("val_"), "best": result.best_metric,
                             "best_step": result.best_step, "history": result.history, "stopped_early": result.stopped_early}
    metrics.update(extra_metrics or {})
    durations["total"] = round(time.perf_counter() - prep.t_start, 2)
    # early stopping can end a run before its planned steps: the estimate (and its correction), restated for the steps run
    total = fitted.plan["total_steps"]
    for e in (est, est.get("corrected")):
        if e is not None:
            e["seconds_total_for_steps_run"] = cost.restated_for_steps(e, result.steps, total)
    metrics["cost"] = {"estimated": est, "actual": {"seconds_total": durations["total"], "seconds_train": result.train_seconds,
                                                     "train_samples_per_second": result.samples_per_second,
                                                     "train_tokens_per_second": result.tokens / max(result.train_seconds, 1e-9),
                                                     "peak_memory_bytes": cost.peak_memory_bytes(accelerator.device)}}

    # --- artifacts; run.json last: its presence marks a finished run ---
    data = prep.data
    run_info = {
        "data": {"files": data.report["files"], "splits": {k: v["sha256"] for k, v in data.report["splits"].items()}},
        "task": {"type": task.name, "model_class": task.model_class},
        "model": {"reference": cfg.model.name, "path": str(prep.model_dir), **fitted.info, "converted": prep.conversion},
        "seed": {"split": cfg.data.seed, "train": cfg.train.seed},
        "precision": precision, "resolved": fitted.plan,
        "hardware": artifacts.hardware(), "versions": artifacts.library_versions(),
        "durations_s": durations, "resumed": resume, "steps": result.steps,
        # model FLOP/s achieved in training beside the device's measured matmul peak (training/cost.py utilisation)
        "utilisation": cost.utilisation(est, result.tokens, result.train_seconds),
        "distributed": {"processes": accelerator.num_processes, "strategy": cfg.train.distributed.strategy,
                        "sharded": _sharded(accelerator), "weights_held_per_process": round(fitted.weights_held, 4),
                        "backend": str(accelerator.state.backend or "none"),
                        "threads_per_process": _threads()},
    }
    artifacts.write_json(out / "metrics.json", metrics)
    artifacts.write_json(out / "data_report.json", data.report)
    with _stage(durations, "report"):  # from the files above and run_info (run.json is not written yet)
        build_card(out, run=run_info)
        build_report(out, run=run_info)
    durations["total"] = round(time.perf_counter() - prep.t_start, 2)  # the whole run, report included
    metrics["cost"]["actual"]["seconds_total"] = durations["total"]
    artifacts.write_json(out / "metrics.json", metrics)
    if tracker is not None and tracker.backend is not None:
        with _stage(durations, "tracking"):
            run_info["tracking"] = _send_to_tracker(tracker, cfg, out, metrics, run_info, result.steps, prep.console)
    artifacts.write_json(out / artifacts.FINISHED_MARKER, run_info)  # last: a run that failed before keeps ...
    for name in (artifacts.CHECKPOINT, artifacts.CHECKPOINT + ".old"):  # ... its checkpoint: --resume finishes it
        shutil.rmtree(out / name, ignore_errors=True)
    _print_summary(prep.console, task, metrics, est, durations, out)
    return metrics


def _send_to_tracker(tracker: tracking.Tracker, cfg: RunConfig, out: Path, metrics: dict, run_info: dict, step: int,
                     console: Console) -> dict:
    """The finished run's test metrics (model and baselines), promotion, cost and evidence to the tracker; the model
    too with tracking.log_model, registered (tracking.register_as) only when promoted. Returns run.json's record."""
    tracker.log_metrics(tracking.final_metrics(metrics), step, what="test metrics")
    tracker.set_tags({"tuneforge.promoted": str(bool(metrics["promoted"])).lower(),
                      "tuneforge.main_metric": metrics["main_metric"]})
    tracker.log_artifacts({"report.html": out / "report.html", "model_card/README.md": out / "model" / "README.md",
                           "metrics.json": out / "metrics.json", "audit.json": out / "audit.json",
                           "config.yaml": out / "config.yaml", "data_report.json": out / "data_report.json"})
    tracker.log_dict("run.json", run_info)
    registered = None
    if cfg.tracking.log_model:
        tracker.log_artifacts({"model": out / "model"})
        if cfg.tracking.register_as and metrics["promoted"]:
            registered = tracker.register("model", cfg.tracking.register_as)
    tracker.end("FINISHED")
    record = tracker.record() | {"registered": registered}
    if record.get("url"):
        console.print(f"[bold]tracking[/] {record['url']}")
    if record["not_logged"]:
        console.print(f"[yellow]tracking[/]: {len(record['not_logged'])} item(s) were not logged to {tracker.backend} "
                      f"(the run itself is complete; run.json lists them): " + "; ".join(record["not_logged"][:3]))
    return record


def _test_without_training_copies(prep: Prepared, cfg: RunConfig, predictor) -> dict | None:
    """audit.leakage: allow trains on copies of test rows: the test metrics again on the test rows that have no copy
    in training (None when no test row has one)."""
    leaked = {(r["file"], r["row"]) for r in prep.audit["leakage"].get("test_rows_in_training", [])}
    test = prep.data.splits.test
    if not leaked or cfg.audit.leakage != "allow":
        return None
    keep = [k for k, row in enumerate(test.rows) if (test.source, row) not in leaked]
    out = {"rows": len(keep), "rows_left_out": len(test) - len(keep)}
    if not keep:
        return out | {"note": "every test row has a copy in training: nothing left to score"}
    splits, y, baselines = prep.task.test_subset(prep.data.splits, prep.y, prep.baselines, keep)
    result, _ = prep.task.evaluate(cfg, prep.label_space, splits, y, predictor, baselines)
    judge(result, cfg, get_spec(cfg.task.type).direction(result["main_metric"]))
    return out | {k: result[k] for k in ("main_metric", "test", "best_baseline", "beats_baselines", "promoted",
                                         "promotion_reason") if k in result}


def audit_only(cfg: RunConfig, console: Console) -> dict:
    """`tuneforge audit`: the data stage and the audit, nothing trained (a task's own checks may read the pre-trained
    model, e.g. label errors judged on its frozen features)."""
    from tuneforge.tasks.behaviour import get_task

    task = get_task(cfg.task.type)
    data = task.prepare(cfg)
    model_dir = task.resolve_model(cfg.model.name)[0]
    return audit_data(cfg, task, data, task.load_tokenizer(model_dir), model_dir, console)[0]


def audit_data(cfg: RunConfig, task, data, tokenizer, model_dir: Path, console: Console) -> tuple[dict, int, str]:
    """Run the audit and print its summary; (report, max_length, why): the token lengths it measures also
    settle model.max_length when the config leaves it to the data."""
    from tuneforge.data.audit import audit

    lengths = task.token_lengths(cfg, tokenizer, data)
    max_length, why = task.max_length(cfg, lengths["train"], tokenizer, model_dir)
    report = audit(data.splits, data.report["removed"], lengths, max_length, cfg.audit, data.duplicates,
                   task.audit_sections(cfg, data, tokenizer, max_length), data.report.get("long_texts"))
    _print_audit(console, report)
    return report, max_length, why


def check_audit(report: dict) -> None:
    """Stop (exit code 3) on a blocking finding, naming the rows."""
    from tuneforge.errors import AuditBlocked

    leakage = report["leakage"]
    if leakage["severity"] == "blocking":
        shown = []
        for group in leakage["groups"][:10]:
            shown.append(" = ".join(f"{r['split']} {r['file']} row {r['row']}" for r in group["rows"])
                         + f" ({group['kind']}, similarity {group['similarity']:.2f})")
        more = len(leakage["groups"]) - len(shown)
        raise AuditBlocked(
            f"{leakage['held_out_rows_leaked']} validation/test rows also sit in another split:\n  "
            + "\n  ".join(shown) + (f"\n  ... and {more} more (tuneforge audit writes them all to audit.json)" if more else ""),
            fix="set audit.leakage: drop (the default) to leave the copies out of training, remove them from the data "
                "file yourself, or set audit.leakage: allow to train on them")


def _print_audit(console: Console, report: dict) -> None:
    from tuneforge.data.audit import summarise

    table = Table(title="data audit")
    for col in ("check", "severity", "finding"):
        table.add_column(col)
    colour = {"info": "green", "warning": "yellow", "blocking": "bold red"}
    for name, section in report.items():
        if name == "summary":
            continue
        table.add_row(name, f"[{colour[section['severity']]}]{section['severity']}[/]", summarise(name, section))
    console.print(table)
    for name, section in report.items():
        if isinstance(section, dict) and section.get("display"):  # a task's dry run, e.g. the rendered chat template
            console.print(f"[bold]{name}[/]")
            console.print(section["display"], markup=False, highlight=False)


def _decontamination_phrase(report: dict) -> str:
    d = report.get("decontamination") or {}
    if not d.get("rows_left_out"):
        return ""
    return (f"; {d['rows_left_out']} of them training rows left out as copies of rows of your "
            f"{' and '.join('test' if r == 'test' else 'validation' for r in d['against'])} file (audit.leakage: drop; "
            "each with the row it matches in data_report.json)")


def _groups_phrase(report: dict) -> str:
    g = report["duplicate_groups"]
    if not g["kept_together"]:
        return "no near-duplicate groups"
    where = ("in one split each" if report["test_source"] == "carved" else
             "between train and validation" if report.get("val_source", "carved") == "carved" else "in training")
    return (f"{g['kept_together']} near-duplicate groups ({g['rows_in_groups']} rows, largest {g['largest']}) "
            f"kept whole {where}")


def _record_settings(model_dir: Path, settings: dict) -> None:
    """The task's settings for predict and serve, kept under `tuneforge` in config.json (transformers ignores it)."""
    import json

    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg[artifacts.SETTINGS_KEY] = settings
    artifacts.write_text(path, json.dumps(cfg, indent=2))


@contextmanager
def _progress(console: Console):
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
    task = progress.add_task("train", total=None, info="")
    state = {"info": ""}

    def update(step: int, total: int, row: dict | None) -> None:
        if row is not None:
            metric = next(k for k in row if k.startswith("val_") and k != "val_loss")
            state["info"] = f"loss {row['train_loss']:.3f} val {metric[4:]} {row[metric]:.3f}"
        progress.update(task, completed=step, total=total, info=state["info"])

    with progress:
        yield update


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _sharded(accelerator) -> bool:
    from tuneforge.training.distributed import is_sharded

    return is_sharded(accelerator)  # FSDP on; Accelerate ignores an FSDP plugin in a single process


def _print_summary(console: Console, task, metrics: dict, est: dict, durations: dict, out: Path) -> None:
    table = Table(title="test split: model vs baselines")
    header, rows = task.summary_rows(metrics)
    for col in ["", *header]:
        table.add_column(col, justify="right" if col else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    clean = metrics.get("test_without_training_copies")
    if clean and clean.get("test"):
        key, best = clean["main_metric"], clean.get("best_baseline")
        console.print(f"[yellow]audit.leakage: allow[/]: {clean['rows_left_out']} test rows have a copy in training; on the "
                      f"other {clean['rows']} the model's {key} is {clean['test']['model'][key]:.4f}"
                      + (f" against {best}'s {clean['test']['baselines'][best][key]:.4f}" if best else ""))
    verdict = "beats every baseline" if metrics["beats_baselines"] else "does NOT beat every baseline"
    console.print(f"The fine-tuned model {verdict} on test {metrics['main_metric']}.")
    console.print(("[bold green]promoted[/]: " if metrics["promoted"] else "[bold red]not promoted[/]: ") + metrics["promotion_reason"])
    for col, s in (metrics.get("slices") or {}).items():
        if s["warning"]:
            console.print(f"[yellow]slice warning[/]: {metrics['main_metric']} differs by {s['largest_gap']:.3f} across {col} "
                          f"({s['between']['best']} vs {s['between']['worst']})")
    if est.get("corrected"):
        est = est["corrected"]  # the estimate as corrected by the first training steps
    rest_est, rest = est["seconds_total"] - est["seconds_train"], durations["total"] - durations["train"]
    console.print(f"[bold]cost[/] whole run estimated {_fmt_s(est['seconds_total'])} (training {_fmt_s(est['seconds_train'])} + "
                  f"the rest {_fmt_s(rest_est)}), actual {_fmt_s(durations['total'])} (training {_fmt_s(durations['train'])} + the rest "
                  f"{_fmt_s(rest)}); peak memory {metrics['cost']['actual']['peak_memory_bytes'] / 2**30:.1f} GiB")
    if est["seconds_total_for_steps_run"] < est["seconds_total"] - 0.5:
        console.print(f"[bold]cost[/] early stopping ended training before its planned steps; for the steps run the "
                      f"estimate was {_fmt_s(est['seconds_total_for_steps_run'])}")
    console.print(f"[bold]report[/] {out / 'report.html'}; model card {out / 'model' / 'README.md'}")
    console.print(f"[bold]output[/] {out}  (load: {task.load_hint(out / 'model')})")
