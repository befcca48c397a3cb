"""Kill -9 anywhere, resume exactly. `tuneforge run` (each task) and `tuneforge tune` run as real processes, are killed
with SIGKILL at a random (seeded) moment of training, and `--resume` runs them to the end: the final weights (or the
search's finished trials) equal those of a run never stopped, bit for bit. A checkpoint save killed at any point of its
protocol leaves a checkpoint that --resume can trust, never a torn one, and a trial killed and retried counts once in
the pruning of the trials after it.

The kill lands a random delay after a checkpoint of a random step appears (every step writes one here), so it falls in
a step, in an evaluation or in the next checkpoint's save; no test sleeps on a guess of the machine's speed: each
waits for files, with a generous timeout. The killed run is `python -m tuneforge` in a process of its own; the resume
goes through the CLI's entry point in the test's process (an interpreter start costs 8 s of imports here).

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/test_kill_resume.py   # ~70 s on 2 cores
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_rows
from test_causal_lm_pipeline import _write_jsonl, pair_rows
from test_token_pipeline import _write_conll

from tuneforge import artifacts
from tuneforge.config import parse_config
from tuneforge.pipeline import run
from tuneforge.training import checkpoint as ckpt

TIMEOUT_S = 300  # for one process to reach a point: generous, a shared 2-core machine can be slow
SEARCH_SPACE = {"train.learning_rate": {"low": 1e-3, "high": 2e-2, "log": True},
                "train.weight_decay": {"low": 0.0, "high": 0.1}, "train.warmup_ratio": [0.0, 0.06]}


# ------------------------------------------------------------------ helpers

def _start(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m tuneforge ARGS` in a process of its own, its output in `log`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "tuneforge", *args], stdout=f, stderr=subprocess.STDOUT, env=env)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.is_file() else ""


def _step_of(checkpoint: Path) -> int:
    """The step of the checkpoint in `checkpoint`, -1 while there is none (or it is being replaced as we read)."""
    try:
        return json.loads((checkpoint / "state.json").read_text())["counters"]["step"]
    except (OSError, ValueError, KeyError):
        return -1


def _kill_after_checkpoint(args: list[str], checkpoint: Path, at_step: int, delay_s: float, log: Path) -> None:
    """Start the command, wait until `checkpoint` holds step `at_step` or later, wait `delay_s` more, SIGKILL it."""
    proc = _start(args, log)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while _step_of(checkpoint) < at_step:
            if proc.poll() is not None:
                pytest.fail(f"exit {proc.returncode} before a checkpoint of step {at_step}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint of step {at_step} after {TIMEOUT_S} s:\n{_tail(log)}")
            time.sleep(0.005)
        time.sleep(delay_s)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself before the kill:\n{_tail(log)}"


def _resume(args: list[str]) -> None:
    """`tuneforge ARGS --resume`, through the CLI's entry point in this process: one interpreter start (8 s of imports
    on a slow machine) saved; the killed run's part ran in a process of its own."""
    from tuneforge.cli import main

    assert main([*args, "--resume"]) == 0


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "model" / "model.safetensors"))
    b = load_file(str(b_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}: max |diff| " \
                       f"{max(float((a[k] - b[k]).abs().max()) for k in differ):.3g}"


def _kill_and_resume_run(raw: dict, tmp_path: Path, seed: int) -> dict:
    """An uninterrupted run of `raw`, and the same run killed at a random step and resumed: their weights match.
    Returns what the kill left (for the caller's checks)."""
    rng = random.Random(seed)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(parse_config({**raw, "output": {"dir": str(straight)}}))
    total = json.loads((straight / "run.json").read_text())["steps"]
    assert total >= 12, "too few steps for a kill mid-training"

    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump({**raw, "output": {"dir": str(killed)}}, sort_keys=False))
    at_step = rng.randint(2, total // 2)
    _kill_after_checkpoint(["run", str(cfg_path)], killed / artifacts.CHECKPOINT, at_step, rng.uniform(0, 0.05),
                           tmp_path / "killed.log")
    assert not (killed / artifacts.FINISHED_MARKER).exists()
    trusted = ckpt.trusted_checkpoint(killed / artifacts.CHECKPOINT)
    assert trusted is not None
    left = {"at_step": at_step, "resumes_from": _step_of(trusted), "total": total}
    assert at_step <= left["resumes_from"] < total, left  # killed mid-training, not after it

    _resume(["run", str(cfg_path)])
    assert json.loads((killed / artifacts.FINISHED_MARKER).read_text())["resumed"] is True
    _assert_same_weights(straight, killed)
    a, b = (json.loads((d / "metrics.json").read_text())["validation"] for d in (straight, killed))
    assert (a["best_step"], a["history"]) == (b["best_step"], b["history"])  # the same evaluations, to the last digit
    return left


# ------------------------------------------------------------------ runs, one per task

def test_text_classification_killed_mid_training_resumes_to_the_same_weights(tmp_path, tiny_model_dir, write_csv):
    """A full fine-tune (dropout on): 60 training rows, 8 steps an epoch, 40 steps."""
    raw = {"data": {"path": str(write_csv(make_rows(100))), "val_fraction": 0.2, "test_fraction": 0.2},
           "model": {"name": str(tiny_model_dir), "max_length": 32},
           "train": {"method": "full", "epochs": 5, "batch_size": 8, "learning_rate": 5e-3, "eval_every": 4,
                     "early_stopping_patience": 0, "checkpoint_every": 1},
           "eval": {"bootstrap_samples": 20}}
    _kill_and_resume_run(raw, tmp_path, seed=1)


def test_token_classification_killed_mid_training_resumes_to_the_same_weights(tmp_path, tiny_model_dir):
    """Frozen lower layers, 2 micro-batches per step (an epoch's odd last batch makes a short step)."""
    raw = {"task": {"type": "token-classification"},
           "data": {"path": str(_write_conll(tmp_path / "train.conll", 150, seed=0)), "val_fraction": 0.15,
                    "test_fraction": 0.15},
           "model": {"name": str(tiny_model_dir), "max_length": 16},
           "train": {"method": "frozen", "frozen_layers": 1, "epochs": 4, "batch_size": 8, "grad_accum": 2,
                     "learning_rate": 5e-3, "early_stopping_patience": 0, "checkpoint_every": 1},
           "eval": {"bootstrap_samples": 20}}
    _kill_and_resume_run(raw, tmp_path, seed=2)


def test_causal_lm_killed_mid_training_resumes_to_the_same_weights(tmp_path, tiny_llama_dir):
    """LoRA with dropout on packed rows: the adapters' dropout draws and the packing order must resume exactly."""
    raw = {"task": {"type": "causal-lm"},
           "data": {"path": str(_write_jsonl(tmp_path / "pairs.jsonl", pair_rows(160))), "val_fraction": 0.15,
                    "test_fraction": 0.15},
           "model": {"name": str(tiny_llama_dir), "max_length": 32},
           "train": {"method": "lora", "epochs": 4, "batch_size": 4, "learning_rate": 1e-2,
                     "early_stopping_patience": 0, "checkpoint_every": 1,
                     "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
           "eval": {"bootstrap_samples": 20}}
    _kill_and_resume_run(raw, tmp_path, seed=3)


# ------------------------------------------------------------------ killed before the first checkpoint, at each stage

# `python -c KILLER MODULE ATTR N ARGS...`: tuneforge's CLI in a process that SIGKILLs itself at the N-th call of
# MODULE.ATTR: a kill -9 at an exact stage of the run (callers look the attribute up when they call it)
KILLER = """
import importlib, os, signal, sys
module = importlib.import_module(sys.argv[1])
real, calls = getattr(module, sys.argv[2]), {"n": 0}
def dies(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] >= int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(module, sys.argv[2], dies)
from tuneforge.cli import main
sys.exit(main(sys.argv[4:]))
"""
STAGES = {  # stage: (module, attribute, the call that dies, what the kill leaves behind)
    "data": ("tuneforge.data.prepare", "assemble", 1, set()),
    "baselines": ("tuneforge.tasks.classification.evaluate", "baseline_predictions", 1,
                  {"config.yaml", "audit.json", artifacts.PREPARED}),
    "training": ("tuneforge.training.loop", "_optimizer_step", 3,
                 {"config.yaml", "audit.json", artifacts.PREPARED, artifacts.BASELINES}),
    "export": ("tuneforge.models.load", "export_model", 1,
               {"config.yaml", "audit.json", artifacts.PREPARED, artifacts.BASELINES, artifacts.CHECKPOINT}),
}


def test_a_run_killed_at_any_stage_before_its_first_checkpoint_resumes_to_the_same_model(tmp_path, tiny_model_dir,
                                                                                          write_csv, monkeypatch):
    """kill -9 in the data stage, the baselines, training before the first checkpoint (checkpoint_minutes keeps it
    minutes away) or the export: `--resume` finishes the run, never a dead end, with the weights and test metrics of a
    run never stopped; what was done before the kill (audit, baselines) is kept, not done again."""
    from tuneforge.tasks.classification import evaluate

    raw = {"data": {"path": str(write_csv(make_rows(100))), "val_fraction": 0.2, "test_fraction": 0.2},
           "model": {"name": str(tiny_model_dir), "max_length": 32},
           "train": {"method": "full", "epochs": 3, "batch_size": 8, "learning_rate": 5e-3, "eval_every": 4,
                     "early_stopping_patience": 0},
           "eval": {"bootstrap_samples": 20}}
    straight = tmp_path / "straight"
    run(parse_config({**raw, "output": {"dir": str(straight)}}))
    expected = json.loads((straight / "metrics.json").read_text())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for stage, (module, attr, nth, left) in STAGES.items():
        out = tmp_path / stage
        cfg_path = tmp_path / f"{stage}.yaml"
        cfg_path.write_text(yaml.safe_dump({**raw, "output": {"dir": str(out)}}, sort_keys=False))
        proc = subprocess.run([sys.executable, "-c", KILLER, module, attr, str(nth), "run", str(cfg_path)],
                              env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        assert proc.returncode == -signal.SIGKILL, f"{stage}: {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        found = {p.name for p in out.iterdir()} - {artifacts.LOCK_FILE} if out.exists() else set()
        assert found == left, stage
        if artifacts.BASELINES in left:  # scored before the kill: the resume reads them back instead
            monkeypatch.setattr(evaluate, "baseline_predictions", lambda *a, **k: pytest.fail("baselines scored again"))
        _resume(["run", str(cfg_path)])
        monkeypatch.undo()
        _assert_same_weights(straight, out)
        got = json.loads((out / "metrics.json").read_text())
        assert got["test"] == expected["test"] and got["validation"]["history"] == expected["validation"]["history"], stage


# ------------------------------------------------------------------ a search

def _finished_trials(out: Path) -> dict[int, tuple[dict, float]]:
    """{slot: (params, value)} of the study's finished trials; a retry counts as the trial it replaces."""
    from tuneforge.tuning.study import slot_of

    study = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.sqlite'}")
    trials = study.get_trials(deepcopy=False)
    return {slot_of(t, trials): (dict(t.params), t.value) for t in trials
            if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)}


def test_search_killed_in_its_second_trial_resumes_to_the_same_trials(tmp_path, tiny_model_dir, write_csv):
    """3 trials of 15 steps; SIGKILL in trial 1 leaves it RUNNING; `tune --resume` fails it, runs its values again
    before trial 2, whose sampler then sees what it saw in the search never stopped: the same values and scores for
    every trial, and the same final model."""
    from tuneforge.tuning import search

    rng = random.Random(4)
    raw = {"data": {"path": str(write_csv(make_rows(60))), "val_fraction": 0.2, "test_fraction": 0.2},
           "model": {"name": str(tiny_model_dir), "max_length": 32},
           "train": {"method": "full", "epochs": 3, "batch_size": 8, "learning_rate": 5e-3, "eval_every": 3,
                     "early_stopping_patience": 0, "checkpoint_every": 1},
           "eval": {"bootstrap_samples": 20},
           "tune": {"trials": 3, "space": SEARCH_SPACE, "seed": 7, "pruning": False}}  # each trial to its end
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    search.tune(parse_config({**raw, "output": {"dir": str(straight)}}))
    expected = _finished_trials(straight)
    assert sorted(expected) == [0, 1, 2]

    cfg_path = tmp_path / "tune.yaml"
    cfg_path.write_text(yaml.safe_dump({**raw, "output": {"dir": str(killed)}}, sort_keys=False))  # the space's order
    args = ["tune", str(cfg_path), "--trials", "3"]
    _kill_after_checkpoint(args, killed / "trials" / "1" / artifacts.CHECKPOINT, rng.randint(2, 8),
                           rng.uniform(0, 0.05), tmp_path / "killed.log")
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{killed / 'study.sqlite'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING", "WAITING"]

    _resume(args)
    assert _finished_trials(killed) == expected
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{killed / 'study.sqlite'}")
    assert [(t.number, t.state.name, t.user_attrs.get("retry_of")) for t in study.trials] == \
        [(0, "COMPLETE", None), (1, "FAIL", None), (2, "COMPLETE", None), (3, "COMPLETE", 1)]
    assert study.trials[2].datetime_start > study.trials[3].datetime_start  # the retry ran in trial 1's place
    _assert_same_weights(straight, killed)  # kept from its trial, or trained again (trial 0): the same model


# ------------------------------------------------------------------ the checkpoint's own protocol

class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler catches it."""


def _save(directory: Path, step: int) -> None:
    """A real checkpoint of a small model whose weights say which save wrote them."""
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(float(step))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt.save_checkpoint(directory, trainable={"weight": torch.full((2, 3), float(step))}, best=None, optimizer=opt,
                         scheduler=sched, counters={"step": step})


def _loaded_step(directory: Path) -> int:
    """The step --resume would continue from; its weights must be that same save's."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trainable, _, counters = ckpt.load_checkpoint(directory, optimizer=opt, scheduler=sched)
    assert torch.equal(trainable["weight"], torch.full((2, 3), float(counters["step"])))  # not a mix of two saves
    return counters["step"]


def test_a_save_killed_at_any_point_leaves_a_checkpoint_resume_trusts(tmp_path, monkeypatch):
    """Every file operation of a save in turn is where a kill lands (a file half written, a folder half deleted, a
    rename not made), twice in a row: --resume then finds the last or an earlier complete checkpoint, never a torn
    one, and the next save cleans up after the killed ones."""
    real_save, real_write, real_rename, real_rmtree = ckpt.save_file, Path.write_text, Path.rename, shutil.rmtree
    ops = {"n": 0, "die_at": -1}

    def dies(op, torn=None):
        def wrapped(*args, **kwargs):
            ops["n"] += 1
            if ops["n"] == ops["die_at"]:
                if torn:
                    torn(*args)
                raise _Killed
            if ops["n"] > ops["die_at"] > 0:  # dead: a cleanup on the way out (an except or finally) does nothing
                raise _Killed
            return op(*args, **kwargs)
        return wrapped

    def half_written(tensors_or_path, path=None):
        Path(path if path is not None else tensors_or_path).write_bytes(b'{"half')

    def half_deleted(path, *args, **kwargs):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else []
        for p in files[: len(files) // 2 + 1]:
            p.unlink()

    monkeypatch.setattr(ckpt, "save_file", dies(real_save, lambda tensors, path: half_written(path)))
    monkeypatch.setattr(Path, "write_text", dies(real_write, lambda self, text: half_written(self)))
    monkeypatch.setattr(Path, "rename", dies(real_rename))
    monkeypatch.setattr(shutil, "rmtree", dies(real_rmtree, half_deleted))

    ops["n"] = 0
    _save(tmp_path / "count" / "checkpoint", 1)
    per_save = ops["n"]  # the operations of a save over no earlier checkpoint; one over an earlier one has 2 more
    assert per_save >= 6
    for first in range(1, per_save + 3):
        for second in range(1, per_save + 3):
            out = tmp_path / f"{first}-{second}"
            directory = out / artifacts.CHECKPOINT
            ops["die_at"] = -1
            _save(directory, 1)
            for step, die_at in ((2, first), (3, second)):
                ops["n"], ops["die_at"] = 0, die_at
                try:  # a save over a checkpoint left aside (killed between its renames) has fewer operations
                    _save(directory, step)
                except _Killed:
                    pass
                ops["die_at"] = -1
                artifacts.check_output_dir(out, resume=True, overwrite=False)
                assert _loaded_step(directory) in range(1, step + 1)
            _save(directory, 4)
            assert _loaded_step(directory) == 4
            assert sorted(p.name for p in out.iterdir()) == [artifacts.CHECKPOINT]  # nothing left of the killed saves


def _simulated_search(out: Path, values: list[float], kill_in: int | None = None) -> dict[int, tuple[str, float]]:
    """A search with the default (halving) pruner, no training: trial k reports values[k] at 3 evaluations. With
    `kill_in`, that trial stops after its 2nd evaluation as a killed process leaves it (RUNNING), and the search is
    resumed. {slot: (state, value)} of the trials that did not fail."""
    from types import SimpleNamespace

    from rich.console import Console

    from tuneforge.tuning.search import make_pruner
    from tuneforge.tuning.study import claim, open_storage, open_study, slot_of

    out.mkdir()
    storage = open_storage(f"sqlite:///{out / 'study.sqlite'}")
    meta = {"trials": len(values), "space": {}, "metric": "val_m", "direction": "maximize", "source": "test"}
    pruner = make_pruner(SimpleNamespace(pruning=True, pruner="halving", prune_warmup=0))

    def work(resume: bool) -> None:
        study = open_study(storage, "s", direction="maximize", meta=meta, defaults={}, pruner=pruner, resume=resume,
                           console=Console(quiet=True))
        while (trial := claim(study, storage, 0, optuna.samplers.RandomSampler)) is not None:
            slot = slot_of(trial, study.get_trials(deepcopy=False))
            for evaluation in range(3):
                trial.report(values[slot], evaluation)
                pruned = trial.should_prune()
                if slot == kill_in and evaluation == 1 and not resume:
                    return  # killed: the trial stays RUNNING, its rung recorded
                if pruned:
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    break
            else:
                study.tell(trial, values[slot])

    work(resume=False)
    if kill_in is not None:
        work(resume=True)
    trials = optuna.load_study(study_name="s", storage=storage).get_trials(deepcopy=False)
    return {slot_of(t, trials): (t.state.name, t.value) for t in trials if t.state.name != "FAIL"}


def test_a_trial_killed_and_retried_counts_once_in_the_pruning_of_later_trials(tmp_path):
    """Successive halving ranks a trial among all that reached its rung; the killed trial 1 reached rung 0 before its
    retry reached it again with the same value. Counted twice, it would let trial 4 (second best) through, which the
    search never stopped prunes (the best of 5 goes on; the best 2 of 6 would)."""
    values = [0.9, 0.8, 0.1, 0.2, 0.85]
    straight = _simulated_search(tmp_path / "straight", values)
    assert [straight[k][0] for k in range(5)] == ["COMPLETE", "PRUNED", "PRUNED", "PRUNED", "PRUNED"]
    assert _simulated_search(tmp_path / "killed", values, kill_in=1) == straight
