"""The Optuna study behind `tuneforge tune`: its storage (SQLite file or a shared PostgreSQL database), a fixed number
of trial slots that several processes claim one at a time, and the recovery of trials a killed process left behind.

The study holds exactly `tune.trials` trials that are not FAIL: the process that creates it enqueues them all as
WAITING slots (trial 0 fixed to the config's own values), and a worker starts a trial only by turning one slot from
WAITING to RUNNING, which the database does atomically (row lock): no slot runs twice, and no process creates a
trial beyond the total. A trial that fails is replaced by a new slot, so the total holds.
"""
from __future__ import annotations

import os
import socket
import time

import numpy as np

from tuneforge.errors import ConfigError, OutputError

META = "tuneforge"  # study user attribute: the search's definition, written once the slots are enqueued


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and files."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not parseable: nothing to hide that we can find
        return url


def _driver_url(url: str) -> str:
    """postgresql:// through psycopg (3) when psycopg2 is not installed: SQLAlchemy's default driver is psycopg2."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        import importlib.util

        if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def open_storage(url: str):
    """Optuna's RDBStorage at `url`; a bad or unreachable URL is a ConfigError naming it (password hidden)."""
    import optuna

    if not url.startswith(("sqlite:///", "postgresql", "postgres://", "mysql")):
        raise ConfigError(f"unknown study storage URL {redact(url)}",
                          fix="use sqlite:///PATH (one machine) or postgresql://USER:PASSWORD@HOST:PORT/DB (several)")
    engine_kwargs = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgres") else None
    error = None
    for attempt in range(3):  # processes started at once race to create Optuna's tables: the loser retries
        try:
            return optuna.storages.RDBStorage(_driver_url(url), engine_kwargs=engine_kwargs)
        except Exception as err:  # noqa: BLE001 - SQLAlchemy, the driver and Optuna raise their own types
            error = err
            if not any(w in str(err).lower() for w in ("already exists", "duplicate")):
                break  # unreachable, refused, no such database or driver: retrying changes nothing
            time.sleep(0.5 + attempt)
    reason = " ".join(str(error).split()).split(" (Background on this error")[0][:300] or type(error).__name__
    raise ConfigError(f"cannot open the study storage {redact(url)}: {reason}",
                      fix="check that the database server runs and the URL's driver, host, port, user, password and "
                          "database are right (postgresql://USER:PASSWORD@HOST:PORT/DB; `pip install 'tuneforge[postgres]'`)")


def study_exists(storage, name: str) -> bool:
    return any(s.study_name == name for s in storage.get_all_studies())


def open_study(storage, name: str, *, direction: str, meta: dict, defaults: dict, pruner, resume: bool, console):
    """Create the study with its slots, or join it (another process made it, or this one earlier); on --resume
    the RUNNING trials are stale and are failed and retried. The total may grow (a larger --trials), never shrink."""
    import optuna

    pruner = FailedTrialsIgnored(pruner)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=direction, pruner=pruner)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
        created = False
    if created:
        study.enqueue_trial(defaults, user_attrs={"defaults": True})
        for _ in range(meta["trials"] - 1):
            study.enqueue_trial({})
        study.set_user_attr(META, meta)  # last: joiners wait for it, so they never see half the slots
        return study
    theirs = _wait_for_meta(study, wait=0 if resume else 60)
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {name!r} {study.direction.name.lower()}s its objective, this config {direction}s",
                          fix="use the config the study was started with, or another --study name")
    if theirs and (theirs["space"], theirs["metric"]) != (meta["space"], meta["metric"]):
        raise ConfigError(f"study {name!r} searches another space or metric than this config's "
                          f"(theirs: {theirs['metric']}, {sorted(theirs['space'])})",
                          fix="use the config the study was started with, or another --study name")
    if resume:
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            # with ask/tell Optuna keeps no heartbeat: --resume asserts that no other process works on the study,
            # so a RUNNING trial belongs to a process that was killed
            note(storage, study, t.number, "stale: its process stopped without finishing it; failed on --resume and retried")
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            retry(study, t, same_params=True)
            console.print(f"[bold]search[/] trial {t.number} was left RUNNING by a stopped process: marked FAIL, retried")
    alive = [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.FAIL]
    if len(alive) < meta["trials"] and (resume or theirs is not None):
        for _ in range(meta["trials"] - len(alive)):
            study.enqueue_trial({})
    if theirs is None or theirs.get("trials", 0) < meta["trials"]:
        study.set_user_attr(META, {**(theirs or {}), **meta})
    return study


class FailedTrialsIgnored:
    """A pruner that judges a trial against the study's trials that did not fail, and never stops the defaults'
    trial (the config's own values run to the end: the search's result is compared with them; the defaults'
    evaluations are still recorded at each rung, as the later trials' competitors).

    Optuna's successive halving compares a trial with every trial that reached the same rung, failed ones included.
    A trial that was interrupted (Ctrl-C, or a killed process failed on --resume) is run again from the start as its
    retry, which reaches the same rungs with the same values: counted twice, it would change the later trials'
    pruning from what a search never stopped decides. Its retry stands for it; a crashed trial's values count no more
    than its (absent) final value."""

    def __init__(self, pruner):
        self.pruner = pruner

    def prune(self, study, trial) -> bool:
        decision = self.pruner.prune(_WithoutFailed(study), trial)
        return decision and not trial.user_attrs.get("defaults")


class _WithoutFailed:
    """The study as a pruner sees it: everything the same, but its FAIL trials left out of get_trials."""

    def __init__(self, study):
        self._inner = study

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def get_trials(self, deepcopy: bool = True, states=None) -> list:
        return [t for t in self._inner.get_trials(deepcopy=deepcopy, states=states) if t.state.name != "FAIL"]


def _wait_for_meta(study, wait: float) -> dict | None:
    deadline = time.monotonic() + wait
    while True:
        meta = study.user_attrs.get(META)
        if meta is not None or time.monotonic() >= deadline:
            return meta
        time.sleep(0.5)


def claim(study, storage, seed: int, make_sampler):
    """Turn the first WAITING slot into a RUNNING trial of this process, or None when none is left. The sampler is
    seeded by (seed, trial number), so a trial draws the same values whichever process claims it."""
    import optuna

    study_id = storage.get_study_id_from_name(study.study_name)
    trials = storage.get_all_trials(study_id, deepcopy=False)
    waiting = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    for frozen in sorted(waiting, key=lambda t: (slot_of(t, trials), t.number)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        try:
            if not storage.set_trial_state_values(trial_id, optuna.trial.TrialState.RUNNING):
                continue  # another process took it first
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        study.sampler = make_sampler(int(np.random.SeedSequence([seed, frozen.number]).generate_state(1)[0]))
        trial = optuna.trial.Trial(study, trial_id)  # what Study.ask() does after popping a WAITING trial
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        return trial
    return None


def slot_of(trial, trials) -> int:
    """The number of the trial a retry replaces, through retries of retries; a trial's own number otherwise.

    Slots are claimed in this order, so a retry runs before the later slots, as its trial did: a search stopped in
    trial 1 and resumed runs trial 1's values again before trial 2, and trial 2's sampler then sees the same finished
    trials as in a search never stopped, and draws the same values."""
    by_number = {t.number: t for t in trials}
    number = trial.number
    while (origin := by_number[number].user_attrs.get("retry_of")) is not None and origin in by_number:
        number = origin
    return number


def note(storage, study, number: int, text: str) -> None:
    """A remark on a trial this process does not hold (a Trial object has set_user_attr; a FrozenTrial has not)."""
    storage.set_trial_user_attr(storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), number), "note", text)


def retry(study, trial, *, same_params: bool) -> None:
    """A new slot for a trial that failed: the same values when it was interrupted (the values were fine), fresh
    ones from the sampler when it crashed (the values may be why)."""
    attrs = {"retry_of": trial.number} | ({"defaults": True} if trial.user_attrs.get("defaults") and same_params else {})
    study.enqueue_trial(dict(trial.params) if same_params else {}, user_attrs=attrs)


def counts(trials) -> dict[str, int]:
    out = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "RUNNING": 0, "WAITING": 0}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def check_resumable(storage, name: str, where: str) -> None:
    if storage is None or not study_exists(storage, name):
        raise OutputError(f"nothing to resume: no study {name!r} in {where}",
                          fix="run without --resume to start the search (or pass the --storage and --study it used)")
