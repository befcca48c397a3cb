"""`tuneforge tune`: a hyperparameter search over a run's config. The data is read, cleaned, audited, split and
tokenised once and the baselines scored once; each trial trains with its own train.* values and is judged on
validation only; the best trial's model is then exported and evaluated on the test split, once, as a normal run.

    tuneforge tune examples/sentiment.yaml --trials 20
    tuneforge tune CONFIG --storage postgresql://USER@HOST/DB --study NAME   # on N machines at once: one study
    tuneforge tune CONFIG --nproc 4                                          # each trial data-parallel (torchrun)

Under torchrun (`--nproc N`) every process trains every trial, each its slice of every batch, as `run --nproc`
does: rank 0 alone prepares the data, holds the study, draws each trial's values and sends them to the others, and
decides at each evaluation whether the trial is pruned (all processes then stop it together); the others follow.
"""
from __future__ import annotations

import csv
import io
import math
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tuneforge import artifacts
from tuneforge.config import RunConfig, dump_config
from tuneforge.errors import ConfigError, OutputError
from tuneforge.tuning.space import default_params, fmt_value, resolve_space, spec_json, suggest, trial_config
from tuneforge.tuning.study import check_resumable, claim, counts, open_storage, open_study, redact, retry

STUDY_FILE = "study.sqlite"  # the default storage, inside the output directory
MARKER = "tune.json"  # an unfinished search lives here (its study and storage)
SEARCH_FILE = "search.json"  # every trial, for the report (rebuilt without the storage)
LOCK = ".finalizing"  # taken by the one worker that trains and writes the final run


@dataclass
class Search:
    """What one worker holds across its trials."""
    cfg: RunConfig
    prep: object
    search_space: dict
    source: str
    accelerator: object
    precision: str
    why: str
    out: Path
    study: object
    storage: object
    storage_url: str
    key: str  # the validation row's key that chooses, e.g. val_macro_f1
    direction: str
    seed: int
    console: Console
    deadline: float | None
    bar: object = None
    kept: tuple | None = None  # (trial number, Fitted, durations) of the best trial run in this process
    tracker: object = None  # tracking.Tracker: the search's run; each trial a run nested in it


def make_pruner(tune_cfg):
    """The pruner of tune.pruner, judging each trial's validation metric by evaluation number, 1 for the first (not
    step, so trials with other batch sizes compare; every trial evaluates each eighth of its epoch by default,
    tune.evaluations_per_epoch).

    halving (default): successive halving; a trial reaching evaluation prune_warmup+1 (then 3x, 9x ... that) goes on
    only in the top third of the trials that got there (the best of them while there are fewer than three). At the
    first rung it also needs two others there (`FirstRungCompany`): one search runs its trials one after another, so
    the first trials would otherwise go on for want of competitors, and that rung is where most trials stop. Later
    rungs take no such count: the first trial to reach one goes on if it beats the defaults there (in a measured
    run, a count at every rung stopped the best trial at evaluation 9 and the search found nothing). The bulk of a
    search's trials then cost one evaluation's worth of training, which is what lets a 20-trial search stay within
    a few runs' time. The defaults' trial is never pruned (study.FailedTrialsIgnored).
    median: MedianPruner after 3 finished trials, from evaluation prune_warmup+1; it needs no notion of budget and
    prunes less (a trial must fall below the median), so a search costs more."""
    import optuna

    if not tune_cfg.pruning:
        return optuna.pruners.NopPruner()
    first = tune_cfg.prune_warmup + 1  # the first evaluation at which a trial may be pruned
    if tune_cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=first)
    return FirstRungCompany(optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3), first)


class FirstRungCompany:
    """Successive halving, and at its first rung (evaluation `first`) a trial goes on only with at least `others`
    other trials there: what Optuna's bootstrap_count does, but at that rung alone."""

    RUNG = "completed_rung_0"  # where Optuna's successive halving keeps each trial's value at its first rung

    def __init__(self, halving, first: int, others: int = 2):
        self.halving, self.first, self.others = halving, first, others

    def prune(self, study, trial) -> bool:
        if self.halving.prune(study, trial):  # records the trial's value at the rung it reached
            return True
        if trial.last_step != self.first:
            return False
        there = sum(1 for t in study.get_trials(deepcopy=False) if t.number != trial.number and self.RUNG in t.system_attrs)
        return there < self.others


def _sampler_factory(total: int):
    import optuna

    # a third of the budget (at most Optuna's 10) explores at random before TPE models the results
    startup = min(10, max(2, total // 3))
    return lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def tune(cfg: RunConfig, *, resume: bool = False, console: Console | None = None) -> dict | None:
    """Search, then train and evaluate the best config into output.dir; returns metrics.json's content, or None
    when other processes still run trials of the shared study (the last one to finish writes the run)."""
    import optuna

    from tuneforge.models.resolve import describe
    from tuneforge.pipeline import prepare, prepare_with_accelerator
    from tuneforge.training.loop import epochs_for

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from tuneforge.runlog import make_console

    console = console or make_console()
    out, tc = Path(cfg.output.dir), cfg.tune
    name = tc.study or out.resolve().name
    url = tc.storage or f"sqlite:///{(out / STUDY_FILE).resolve()}"
    storage = None
    from tuneforge import tracking

    tracker = tracking.Tracker()

    def checked_prepare():
        # --- everything that can reject the input happens before the output directory is touched ---
        nonlocal storage, tracker
        tracker = tracking.open_tracker(cfg, out)  # an unreachable tracker stops the search here (exit 2)
        _check_output(out, name, resume=resume, overwrite=cfg.output.overwrite, shared=tc.storage is not None)
        storage = open_storage(url) if tc.storage is not None or (resume and (out / STUDY_FILE).is_file()) else None
        if resume:
            check_resumable(storage, name, redact(url))
            _check_extends(out, storage, name, tc.trials)
        return prepare(cfg, console)

    prep, accelerator, precision, why = prepare_with_accelerator(cfg, console, checked_prepare)
    n_layers = describe(prep.model_dir)["layers"]
    space, source = resolve_space(cfg, prep.task, n_layers, epochs_for(len(prep.ids["train"]), cfg.train))
    space, defaults = default_params(cfg, space, n_train=len(prep.ids["train"]), n_layers=n_layers,
                                     widen=tc.space is None)
    key, mode = prep.task.selection(cfg)
    direction = "maximize" if mode == "max" else "minimize"

    if not accelerator.is_main_process:  # a follower: trains what rank 0 sends, writes nothing
        s = Search(cfg, prep, space, source, accelerator, precision, why, out, None, None, url, key, direction,
                   tc.seed if tc.seed is not None else cfg.train.seed, console, None)
        _follow(s)
        return None

    # --- the output directory, then the study ---
    if cfg.output.overwrite and not resume:
        artifacts.reset_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    if resume:  # a worker that died while writing the final run left its lock
        shutil.rmtree(out / LOCK, ignore_errors=True)
    artifacts.write_json(out / MARKER, {"study": name, "storage": redact(url)})
    artifacts.write_json(out / "audit.json", prep.audit)
    storage = storage or open_storage(url)
    meta = {"trials": tc.trials, "space": spec_json(space), "metric": key, "direction": direction, "source": source}
    study = open_study(storage, name, direction=direction, meta=meta, defaults=defaults, pruner=make_pruner(tc),
                       resume=resume, console=console)
    s = Search(cfg, prep, space, source, accelerator, precision, why, out, study, storage, url, key, direction,
               tc.seed if tc.seed is not None else cfg.train.seed, console,
               time.monotonic() + 60 * tc.timeout_minutes if tc.timeout_minutes else None, tracker=tracker)
    from tuneforge.pipeline import start_tracking, tracking_ended_on_error

    start_tracking(tracker, prep, cfg, out, name=f"search {name}",
                   tags={"tuneforge.search": f"{tc.trials} trials over {', '.join(space)}"})
    console.print(f"[bold]search[/] study {name} in {redact(url)}: {tc.trials} trials over {', '.join(space)} ({source}); "
                  f"chosen by validation {key.removeprefix('val_')} ({mode}); "
                  + (f"{tc.pruner} pruning" if tc.pruning else "no pruning")
                  + (f" at {tc.evaluations_per_epoch} evaluations per epoch" if tc.evaluations_per_epoch and not cfg.train.eval_every else "")
                  + "; trial 0 runs the config's own values")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            with tracking_ended_on_error(tracker):
                timed_out = _search(s)
                result = _finish(s, timed_out, resume)
                if result is None:  # another process writes the final run; this one's trials are logged
                    tracker.end("FINISHED")
                return result
        finally:
            _send(s, None)  # the followers' stop


def _check_output(out: Path, name: str, *, resume: bool, overwrite: bool, shared: bool) -> None:
    if out.is_file():
        raise OutputError(f"output path {out} is a file", fix="choose a directory with --output / output.dir")
    if not out.exists() or resume or overwrite:
        return
    if (out / artifacts.FINISHED_MARKER).is_file():
        raise OutputError(f"{out} already holds a finished run", fix="pass --overwrite to replace it, --resume with a "
                          "larger --trials to extend its search, or choose another --output")
    if (out / MARKER).is_file():
        import json

        theirs = json.loads((out / MARKER).read_text()).get("study")
        if shared and theirs == name:
            return  # another worker of the same shared study writes its trials here too
        raise OutputError(f"{out} holds an unfinished search (study {theirs!r})",
                          fix="pass --resume to continue it, or --overwrite to start over")
    if any(p.name != artifacts.LOCK_FILE for p in out.iterdir()):
        raise OutputError(f"{out} is not empty and holds no tuneforge search", fix="choose an empty or new --output directory")


def _check_extends(out: Path, storage, name: str, total: int) -> None:
    """--resume of a search that finished is an error unless a larger --trials gives it more to do."""
    if not (out / artifacts.FINISHED_MARKER).is_file():
        return
    c = counts(storage.get_all_trials(storage.get_study_id_from_name(name), deepcopy=False))
    if c["WAITING"] == 0 and c["RUNNING"] == 0 and c["COMPLETE"] + c["PRUNED"] >= total:
        raise OutputError(f"nothing to resume: the search in {out} finished its {c['COMPLETE'] + c['PRUNED']} trials",
                          fix="pass a larger --trials to extend it, or --overwrite to start over")


def _search(s: Search) -> bool:
    """Claim and run trials until no slot is left, the total is reached or the timeout passes (True)."""
    make_sampler = _sampler_factory(s.cfg.tune.trials)
    with _progress(s) as s.bar:
        try:
            while True:
                if s.deadline is not None and time.monotonic() > s.deadline:
                    s.console.print(f"[bold]search[/] timeout of {s.cfg.tune.timeout_minutes:g} min reached: no new trial starts")
                    return True
                c = counts(s.study.get_trials(deepcopy=False))
                if c["COMPLETE"] + c["PRUNED"] + c["RUNNING"] >= s.cfg.tune.trials:
                    return False
                trial = claim(s.study, s.storage, s.seed, make_sampler)
                if trial is None:
                    return False
                _run_trial(s, trial)
        finally:
            _write_results(s)


def _run_trial(s: Search, trial) -> None:
    import optuna

    from tuneforge.pipeline import fit
    from tuneforge.training.loop import TrainingInterrupted

    Pruned, Failed, Complete = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE
    params = suggest(trial, s.search_space)
    shown = ", ".join(f"{k.removeprefix('train.')} {fmt_value(v)}" for k, v in params.items())
    t0 = time.perf_counter()
    try:
        cfg = _trial_config(s, params, source=f"trial {trial.number}")
    except ConfigError as err:  # a combination the schema's cross-checks refuse: reported, pruned, not run
        reason = " ".join(err.message.splitlines()[1:]).strip(" -") or err.message
        trial.set_user_attr("note", f"invalid combination: {reason}")
        s.study.tell(trial, state=Pruned)
        _report(s, trial.number, "PRUNED", None, shown, t0, f"invalid combination: {reason}")
        return
    tdir = s.out / "trials" / str(trial.number)
    tdir.mkdir(parents=True, exist_ok=True)
    artifacts.write_text(tdir / "config.yaml", dump_config(cfg))
    evaluations = 0

    def progress(step: int, total: int, row: dict | None) -> None:
        nonlocal evaluations
        s.bar(info=f"trial {trial.number}: step {step}/{total}")
        if row is None:
            return
        evaluations += 1
        trial.report(float(row[s.key]), evaluations)  # step = the evaluation's number: comparable across batch sizes
        if _agree(s, trial.should_prune()):
            raise optuna.TrialPruned(f"pruned at evaluation {evaluations} (step {step} of {total}): validation "
                                     f"{s.key.removeprefix('val_')} {row[s.key]:.4f}")

    shown_console, s.prep.console = s.prep.console, Console(quiet=True)  # one line per trial, not each trial's plan
    _send(s, {"trial": trial.number, "params": params})
    track = s.tracker.nested(f"trial {trial.number}", params, {"tuneforge.trial": trial.number})
    try:
        fitted = fit(s.prep, cfg, s.accelerator, s.precision, s.why, out=tdir, progress=progress, estimate=False,
                     track=track)
    except optuna.TrialPruned as err:
        trial.set_user_attr("note", str(err))
        s.study.tell(trial, state=Pruned)
        _report(s, trial.number, "PRUNED", None, shown, t0, str(err))
        _end_trial(track, "PRUNED", str(err))
        return
    except (KeyboardInterrupt, TrainingInterrupted):
        trial.set_user_attr("note", "interrupted; retried with the same values")
        s.study.tell(trial, state=Failed)
        retry(s.study, trial, same_params=True)
        _end_trial(track, "INTERRUPTED", "interrupted; retried with the same values")
        raise TrainingInterrupted(f"search interrupted in trial {trial.number}; the finished trials are kept in the study",
                                  fix="run the same command again with --resume to continue") from None
    except Exception as err:
        trial.set_user_attr("note", f"failed: {type(err).__name__}: {err}"[:500])
        s.study.tell(trial, state=Failed)
        retry(s.study, trial, same_params=False)
        _end_trial(track, "FAIL", f"{type(err).__name__}: {err}")
        raise
    finally:
        s.prep.console = shown_console
        s.accelerator.free_memory()  # the accelerator keeps every prepared model and optimizer otherwise
        shutil.rmtree(tdir / artifacts.CHECKPOINT, ignore_errors=True)
    value = fitted.result.best_metric
    artifacts.write_json(tdir / "history.json", {"params": params, "best": value, "best_step": fitted.result.best_step,
                                                 "history": fitted.result.history})
    if not math.isfinite(value):
        trial.set_user_attr("note", f"validation {s.key} is {value}")
        s.study.tell(trial, state=Pruned)
        _report(s, trial.number, "PRUNED", None, shown, t0, f"validation {s.key} is {value}")
        _end_trial(track, "PRUNED", f"validation {s.key} is {value}")
        return
    s.study.tell(trial, value, state=Complete)
    track.log_metrics({f"best_{s.key}": value, "best_step": fitted.result.best_step})
    _end_trial(track, "COMPLETE", "")
    if s.study.best_trial.number == trial.number:  # keep its model: the final run then needs no retraining
        fitted.model.to("cpu")
        s.kept = (trial.number, fitted, dict(s.prep.durations))
    _report(s, trial.number, "COMPLETE", value, shown, t0, "")


def _end_trial(track, state: str, note: str) -> None:
    """A trial's tracked run ends FINISHED when complete, KILLED when pruned or interrupted, FAILED when it failed;
    tagged with the trial's state (tuneforge.trial_state) and note."""
    track.set_tags({"tuneforge.trial_state": state} | ({"tuneforge.note": note[:500]} if note else {}))
    track.end({"COMPLETE": "FINISHED", "FAIL": "FAILED"}.get(state, "KILLED"))


def _trial_config(s: Search, params: dict, **kwargs) -> RunConfig:
    """A trial's config: the search's with the trial's values, evaluating tune.evaluations_per_epoch times per epoch
    of the trial's own steps when train.eval_every is 0 (the pruner's clock is the evaluation's number: an eighth
    of an epoch each, whatever the batch size)."""
    return trial_config_with_cadence(s.cfg, params, lambda: len(s.prep.ids["train"]), **kwargs)


def trial_config_with_cadence(cfg: RunConfig, params: dict, n_train, **kwargs) -> RunConfig:
    """`n_train`: the training rows, or a function giving them (asked only when the cadence is needed)."""
    from tuneforge.training.loop import plan_steps

    trial = trial_config(cfg, params, **kwargs)
    per_epoch_evals = cfg.tune.evaluations_per_epoch
    if not per_epoch_evals or trial.train.eval_every:
        return trial
    per_epoch = plan_steps(n_train() if callable(n_train) else n_train, trial.train)[0]
    return trial_config(cfg, {**params, "train.eval_every": max(1, math.ceil(per_epoch / per_epoch_evals))}, **kwargs)


def _send(s: Search, message: dict | None) -> None:
    """Rank 0 to the processes following it (none without torchrun): the next trial, the final run, or stop."""
    if s.accelerator.num_processes > 1:
        from tuneforge.training.distributed import broadcast_from_main

        broadcast_from_main(s.accelerator, message)


def _agree(s: Search, decision: bool) -> bool:
    """Rank 0's pruning decision, on every process (they stop a trial at the same evaluation)."""
    if s.accelerator.num_processes == 1:
        return decision
    from tuneforge.training.distributed import broadcast_from_main

    return bool(broadcast_from_main(s.accelerator, decision if s.accelerator.is_main_process else None))


def _follow(s: Search) -> None:
    """A process other than rank 0: train each trial rank 0 sends (its slice of each batch), and the final run if
    rank 0 must retrain the best, until rank 0 says stop."""
    import optuna

    from tuneforge.pipeline import fit
    from tuneforge.training.distributed import broadcast_from_main
    from tuneforge.training.loop import TrainingInterrupted

    while True:
        message = broadcast_from_main(s.accelerator, None)
        if message is None:
            return
        cfg = _trial_config(s, message["params"], source=f"trial {message.get('trial', 'best')}")

        def progress(step: int, total: int, row: dict | None) -> None:
            if row is not None and "trial" in message and _agree(s, False):
                raise optuna.TrialPruned()

        try:
            fit(s.prep, cfg, s.accelerator, s.precision, s.why, out=s.out / "trials" / str(message.get("trial", "best")),
                progress=progress, estimate="trial" not in message)
        except optuna.TrialPruned:
            pass
        except TrainingInterrupted:  # all processes stopped at the same step; rank 0 saves the study and says stop
            broadcast_from_main(s.accelerator, None)
            raise
        finally:
            s.accelerator.free_memory()


def _report(s: Search, number: int, state: str, value, shown: str, t0: float, note: str) -> None:
    trials = s.study.get_trials(deepcopy=False)
    c = counts(trials)
    try:
        best = s.study.best_trial
        best_text = f"best {best.value:.4f} (trial {best.number})"
    except ValueError:
        best_text = "no trial complete yet"
    metric = s.key.removeprefix("val_")
    outcome = f"validation {metric} {value:.4f}" if value is not None else note
    s.console.print(f"[bold]trial {number}[/] {state.lower()}: {outcome}; {shown}; {time.perf_counter() - t0:.0f} s")
    s.bar(finished=c["COMPLETE"] + c["PRUNED"], best=best_text)
    _write_results(s)


@contextmanager
def _progress(s: Search):
    """A bar over the study's trials (those of every process), the best value so far and the trial in progress."""
    progress = Progress(TextColumn("[bold]search"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[best]}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=s.console)
    c = counts(s.study.get_trials(deepcopy=False))
    task = progress.add_task("search", total=s.cfg.tune.trials, completed=c["COMPLETE"] + c["PRUNED"], best="", info="")

    def update(**fields) -> None:
        if "finished" in fields:
            fields["completed"] = fields.pop("finished")
        progress.update(task, **fields)

    with progress:
        yield update


def _finish(s: Search, timed_out: bool, resume: bool) -> dict | None:
    """Train (or keep) the best trial's model and write OUT as a finished run, unless other processes still run
    trials (the last to finish writes it) or another worker already does."""
    import optuna

    trials = s.study.get_trials(deepcopy=False)
    c = counts(trials)
    running = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    if running:
        s.console.print(f"[bold]search[/] trials {', '.join(map(str, running))} still run in other processes; the process "
                        f"that finishes the last trial trains the best and writes its output directory")
        return None
    if c["COMPLETE"] == 0:
        raise OutputError(f"no trial of study {s.study.study_name!r} completed ({c['PRUNED']} pruned, {c['FAIL']} failed): "
                          "nothing to choose from", fix="widen tune.space, set tune.pruning: false, or check the trials' "
                          f"notes in {s.out / 'trials.csv'}")
    try:
        os.mkdir(s.out / LOCK)
    except FileExistsError:
        s.console.print(f"[bold]search[/] another process trains the best trial into {s.out}")
        return None
    return _train_best(s, resume, timed_out)


def _train_best(s: Search, resume: bool, timed_out: bool) -> dict:
    from tuneforge.pipeline import estimate_cost, finalize, fit

    best = s.study.best_trial
    cfg = _trial_config(s, best.params, output_dir=str(s.out), source=f"trial {best.number}")
    prep, metric = s.prep, s.key.removeprefix("val_")
    if s.kept and s.kept[0] == best.number:
        fitted, retrained = s.kept[1], False
        prep.durations.update(s.kept[2])
        if fitted.estimate is None:  # trials skip it (seconds each); the run's report states it for the kept one
            fitted.estimate = estimate_cost(prep, cfg, s.accelerator, s.precision)
        s.console.print(f"[bold]search[/] best: trial {best.number}, validation {metric} {best.value:.4f}; its model, "
                        "trained in this process, is the final one")
    else:  # it ran in another process (or before --resume): the same config and seed train it again
        s.console.print(f"[bold]search[/] best: trial {best.number}, validation {metric} {best.value:.4f}; it ran in "
                        "another process, so it is trained again with the same config and seed")
        _send(s, {"params": best.params})
        fitted, retrained = fit(prep, cfg, s.accelerator, s.precision, s.why, out=s.out), True
    artifacts.write_text(s.out / "config.yaml", dump_config(cfg))
    _write_best_yaml(s, cfg, best)
    summary = _summary(s, s.study.get_trials(deepcopy=False)) | {
        "retrained": retrained, "final_validation": fitted.result.best_metric, "finished": True, "timed_out": timed_out}
    _write_results(s, summary)
    s.tracker.log_metrics({"trials_complete": summary["complete"], "trials_pruned": summary["pruned"]})
    return finalize(prep, cfg, fitted, s.accelerator, s.precision, out=s.out, resume=resume,
                    extra_metrics={"search": summary}, tracker=s.tracker)


def _write_best_yaml(s: Search, cfg: RunConfig, best) -> None:
    """OUT/best.yaml: `tuneforge run` takes it as it is; it writes to OUT/best-run, not over this run."""
    raw = yaml.safe_load(dump_config(cfg))
    raw.pop("tune", None)
    raw["output"]["dir"], raw["output"]["overwrite"] = str(s.out / "best-run"), False
    path = s.out / "best.yaml"
    header = (f"# tuneforge run {path}\n# trial {best.number} of study {s.study.study_name}: the best validation "
              f"{s.key.removeprefix('val_')} ({best.value:.4f}) of the search in {s.out}\n")
    artifacts.write_text(path, header + yaml.safe_dump(raw, sort_keys=False))


def _summary(s: Search, trials) -> dict:
    """metrics.json's `search`: how many trials chose the model, which one won and by what."""
    import optuna

    c = counts(trials)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = (max if s.direction == "maximize" else min)(complete, key=lambda t: t.value) if complete else None
    marked = [t for t in trials if t.user_attrs.get("defaults")]
    defaults = next((t for t in marked if t.state == optuna.trial.TrialState.COMPLETE), marked[0] if marked else None)
    return {
        "study": s.study.study_name, "storage": redact(s.storage_url), "planned": s.cfg.tune.trials,
        "trials": c["COMPLETE"] + c["PRUNED"] + c["FAIL"], "complete": c["COMPLETE"], "pruned": c["PRUNED"],
        "failed": c["FAIL"], "trials_that_chose_it": c["COMPLETE"] + c["PRUNED"],
        "best_trial": best.number if best else None, "best_value": best.value if best else None,
        "best_params": dict(best.params) if best else None,
        "defaults_trial": defaults.number if defaults else None,
        "defaults_value": defaults.value if defaults and defaults.state == optuna.trial.TrialState.COMPLETE else None,
        "defaults_params": dict(defaults.params) if defaults else None,
        "chosen_by": f"validation {s.key.removeprefix('val_')}", "direction": s.direction,
        "space": spec_json(s.search_space), "space_source": s.source, "sampler": "TPE", "seed": s.seed,
        "pruner": s.cfg.tune.pruner if s.cfg.tune.pruning else "none", "finished": False,
    }


def _write_results(s: Search, summary: dict | None = None) -> None:
    """OUT/trials.csv and OUT/search.json, rewritten after every trial (a running search can be watched)."""
    from optuna.distributions import distribution_to_json

    trials = [t for t in s.study.get_trials(deepcopy=False) if t.state.name != "WAITING"]
    rows = []
    for t in trials:
        duration = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "params": dict(t.params),
                     "distributions": {k: distribution_to_json(d) for k, d in t.distributions.items()},
                     "intermediate": sorted(t.intermediate_values.items()), "duration_s": duration,
                     "defaults": bool(t.user_attrs.get("defaults")), "retry_of": t.user_attrs.get("retry_of"),
                     "note": t.user_attrs.get("note", "")})
    artifacts.write_json(s.out / SEARCH_FILE, {"summary": summary or _summary(s, trials), "trials": rows})
    keys = list(s.search_space)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["number", "state", "value", *keys, "duration_s", "note"])
    for r in rows:
        writer.writerow([r["number"], r["state"], "" if r["value"] is None else r["value"],
                         *[r["params"].get(k, "") for k in keys],
                         "" if r["duration_s"] is None else round(r["duration_s"], 2), r["note"]])
    artifacts.write_text(s.out / "trials.csv", buf.getvalue())
