"""`tuneforge tune` on a tiny BERT: the search and what it writes, pruning, resume after an interruption, the
errors a user can hit, and two worker processes sharing one PostgreSQL study."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from tuneforge.cli import main
from tuneforge.config import load_config, parse_config
from tuneforge.errors import ConfigError
from tuneforge.pipeline import run
from tuneforge.training import loop
from tuneforge.tuning import search
from tuneforge.tuning.space import default_params, resolve_space

from conftest import make_rows

# the config's own values (lr 5e-3, weight decay 0.01, warm-up 0.06) lie inside: trial 0 runs them
SPACE = {"train.learning_rate": {"low": 1e-3, "high": 2e-2, "log": True}, "train.weight_decay": {"low": 0.0, "high": 0.1},
         "train.warmup_ratio": [0.0, 0.06]}


def _raw(base_config, write_csv, tmp_path, **tune) -> dict:
    # 60 rows: 36 train / 12 validation / 12 test; batch 8, 3 epochs = 15 steps, validation every 3
    raw = base_config(write_csv(make_rows(60)), train={"method": "full", "epochs": 3, "eval_every": 3})
    raw["tune"] = {"trials": 3, "space": SPACE, **tune}
    raw["output"]["dir"] = str(tmp_path / "search")
    return raw


def _study(out: Path, name: str = "search"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.sqlite'}")


class PruneTrial2(optuna.pruners.BasePruner):
    """Prunes trial 2 at its first report: what MedianPruner does to a weak trial, made certain for the test."""

    def prune(self, study, trial) -> bool:
        return trial.number == 2


def test_search_writes_a_finished_run_best_yaml_trials_csv_and_report(base_config, write_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(search, "make_pruner", lambda tune_cfg: PruneTrial2())
    cfg = parse_config(_raw(base_config, write_csv, tmp_path))
    metrics = search.tune(cfg)
    out = tmp_path / "search"
    for name in ("run.json", "metrics.json", "report.html", "model/model.safetensors", "config.yaml", "best.yaml",
                 "trials.csv", "search.json", "audit.json"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint").exists() and not list(out.glob("trials/*/checkpoint"))

    s = metrics["search"]
    assert (s["trials"], s["complete"], s["pruned"], s["failed"], s["trials_that_chose_it"]) == (3, 2, 1, 0, 3)
    assert s["chosen_by"] == "validation macro_f1" and s["best_trial"] in (0, 1)
    assert json.loads((out / "metrics.json").read_text())["search"]["best_params"] == s["best_params"]
    # the final model is the best trial's: its validation score is the search's best value
    assert metrics["validation"]["best"] == pytest.approx(s["best_value"], abs=1e-9)
    assert s["retrained"] is False  # it ran in this process: its model was kept
    # trial 0 ran the config's own values
    assert s["defaults_trial"] == 0 and s["defaults_params"] == {"train.learning_rate": 5e-3, "train.weight_decay": 0.01,
                                                         "train.warmup_ratio": 0.06}

    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["number"], r["state"]) for r in rows] == [("0", "COMPLETE"), ("1", "COMPLETE"), ("2", "PRUNED")]
    assert set(rows[0]) >= {"value", "train.learning_rate", "train.warmup_ratio", "duration_s"}
    assert "pruned at evaluation 1" in rows[2]["note"]
    assert _study(out).trials[2].state == optuna.trial.TrialState.PRUNED

    page = (out / "report.html").read_text()
    assert "<h2>Search</h2>" in page and "Best trial vs the defaults" in page
    assert "optimisation history" in page
    # the tiny model may score the same in both complete trials on one CPU and not on another: the page says which
    values = {json.loads((out / "search.json").read_text())["trials"][i]["value"] for i in (0, 1)}
    assert ("parameter importances" in page) == (len(values) == 2)
    assert ("made no difference here" in page) == (len(values) == 1)

    # best.yaml is a config `tuneforge run` takes as it is, writing beside the search, not over it
    best = load_config(out / "best.yaml")
    assert best.output.dir == str(out / "best-run")
    assert (out / "best.yaml").read_text().startswith(f"# tuneforge run {out / 'best.yaml'}")
    rerun = run(best)
    assert (out / "best-run" / "run.json").is_file()
    assert rerun["validation"]["best"] == pytest.approx(s["best_value"], abs=1e-9)  # same config and seed, same model


def test_interrupted_search_resumes_without_rerunning_finished_trials(base_config, write_csv, tmp_path, monkeypatch):
    raw = _raw(base_config, write_csv, tmp_path, pruning=False)  # every trial runs to its end: the states below are certain
    cfg_path = tmp_path / "tune.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    real_train, real_step = loop.train, loop._optimizer_step
    trainings = {"n": 0}

    def train(*args, **kwargs):  # Ctrl-C at the 3rd optimizer step of the 2nd trial
        trainings["n"] += 1
        steps = {"n": 0}

        def step(*a, **k):
            steps["n"] += 1
            if trainings["n"] == 2 and steps["n"] == 3:
                raise KeyboardInterrupt
            return real_step(*a, **k)

        monkeypatch.setattr(loop, "_optimizer_step", step)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(loop, "train", train)
    with pytest.raises(loop.TrainingInterrupted, match="--resume"):
        search.tune(load_config(cfg_path))
    monkeypatch.setattr(loop, "train", real_train)
    monkeypatch.setattr(loop, "_optimizer_step", real_step)
    out = tmp_path / "search"
    assert not (out / "run.json").exists()
    study = _study(out)
    first = study.trials[0]
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "WAITING", "WAITING"]
    # a process killed mid-trial leaves its trial RUNNING: claim the next slot and never finish it
    stale = study.ask()
    assert stale.number == 2

    assert main(["tune", str(cfg_path), "--resume"]) == 0
    study = _study(out)
    states = {t.number: t.state.name for t in study.trials}
    assert states == {0: "COMPLETE", 1: "FAIL", 2: "FAIL", 3: "COMPLETE", 4: "COMPLETE"}
    assert study.trials[0].datetime_complete == first.datetime_complete  # not run again
    assert study.trials[3].user_attrs["retry_of"] == 1 and study.trials[3].params == study.trials[1].params
    assert study.trials[4].user_attrs["retry_of"] == 2 and "stale" in study.trials[2].user_attrs["note"]
    metrics = json.loads((out / "metrics.json").read_text())
    s = metrics["search"]
    assert (s["complete"], s["pruned"], s["failed"], s["trials_that_chose_it"]) == (3, 0, 2, 3)
    assert metrics["validation"]["best"] == pytest.approx(s["best_value"], abs=1e-9)
    assert (s["best_trial"] == 0) == s["retrained"]  # trial 0 ran before the resume: trained again


def test_errors_exit_2_with_a_message(base_config, write_csv, tmp_path, capsys):
    raw = _raw(base_config, write_csv, tmp_path)
    raw["tune"]["space"] = {"train.learning_rte": [1e-3]}
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text(yaml.safe_dump(raw))
    assert main(["tune", str(bad_key)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) train.learning_rte" in err and "train.learning_rate" in err and "train.lora.r" in err

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_raw(base_config, write_csv, tmp_path)))
    assert main(["tune", str(good), "--storage", "redis://localhost/0"]) == 2
    assert "unknown study storage URL redis://localhost/0" in capsys.readouterr().err
    assert main(["tune", str(good), "--storage", "postgresql://me:secret@127.0.0.1:1/db"]) == 2
    err = capsys.readouterr().err
    assert "cannot open the study storage postgresql://me:***@127.0.0.1:1/db" in err and "secret" not in err
    assert main(["tune", str(good), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "search").exists()  # nothing written

    raw = _raw(base_config, write_csv, tmp_path)
    raw["tune"]["space"] = {"train.warmup_ratio": [0.0, 0.1]}  # the config's 0.06 is not a choice
    with pytest.raises(ConfigError, match="does not contain the config's own value 0.06"):
        cfg = parse_config(raw)
        default_params(cfg, resolve_space(cfg, None, 2)[0], n_train=36, n_layers=2, widen=False)


def test_a_combination_the_config_refuses_is_pruned_with_the_reason(base_config, write_csv, tmp_path):
    raw = _raw(base_config, write_csv, tmp_path)
    raw["tune"]["space"] = {"train.lora.r": [4]}  # LoRA settings while train.method is full: refused by the schema
    cfg = parse_config(raw)
    study = optuna.create_study(direction="maximize")
    (tmp_path / "search").mkdir()
    s = search.Search(cfg, None, resolve_space(cfg, None, 2)[0], "test", None, "fp32", "", tmp_path / "search", study,
                      None, "sqlite:///:memory:", "val_macro_f1", "maximize", 0, search.Console(quiet=True), None,
                      bar=lambda **fields: None)
    search._run_trial(s, study.ask())
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert "invalid combination" in trial.user_attrs["note"] and "train.method is not 'lora'" in trial.user_attrs["note"]


def test_default_spaces_come_from_the_task_and_hold_the_config_values(base_config, write_csv):
    from tuneforge.tasks.behaviour import get_task

    cfg = parse_config(base_config("x.csv", train={"method": "frozen", "weight_decay": 0.05, "epochs": None}))
    space, source = resolve_space(cfg, get_task("text-classification"), 6)
    assert set(space) == {"train.learning_rate", "train.epochs", "train.weight_decay", "train.warmup_ratio",
                          "train.frozen_layers"} and "text-classification" in source
    space, params = default_params(cfg, space, n_train=36, n_layers=6, widen=True)
    assert 0.05 in space["train.weight_decay"] and params["train.frozen_layers"] == 3
    assert params["train.epochs"] == 8 and space["train.epochs"].high == 8  # null: the epochs the run would choose
    # given the run's own epochs, the default space spans half to twice them (no trial of many runs' cost)
    assert resolve_space(cfg, get_task("text-classification"), 6, 2)[0]["train.epochs"].model_dump(exclude_none=True) \
        == {"low": 1, "high": 4, "log": False}
    assert resolve_space(cfg, get_task("text-classification"), 6, 8)[0]["train.epochs"].high == 8  # max_auto_epochs
    lm = parse_config({"task": {"type": "causal-lm"}, "data": {"path": "x.jsonl"}})
    lm_space, _ = resolve_space(lm, get_task("causal-lm"), 2)
    assert lm_space["train.lora.r"] == [8, 16, 32] and lm_space["train.epochs"].high == 3


def test_pruner_is_successive_halving_by_default_median_or_none():
    pruner = search.make_pruner(parse_config({"data": {"path": "x"}}).tune)
    assert isinstance(pruner, search.FirstRungCompany) and (pruner.first, pruner.others) == (1, 2)
    assert isinstance(pruner.halving, optuna.pruners.SuccessiveHalvingPruner)
    assert (pruner.halving._min_resource, pruner.halving._reduction_factor, pruner.halving._bootstrap_count) == (1, 3, 0)
    cfg = parse_config({"data": {"path": "x"}, "tune": {"pruner": "median", "prune_warmup": 2}})
    pruner = search.make_pruner(cfg.tune)
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert (pruner._n_startup_trials, pruner._n_warmup_steps) == (3, 3)  # prunable from evaluation 3


def test_successive_halving_keeps_the_top_third_and_needs_company_at_the_first_rung():
    """The defaults' trial runs to the end; a later trial goes on past a rung (evaluations 1, 3, 9) only in the top
    third (the best while fewer than three got there), and past the first only with two others there: the first
    trial after the defaults stops at evaluation 1, the weak ones too (an eighth of an epoch of training), a trial
    that beats the defaults at a later rung goes on although it is the first to reach it."""
    from tuneforge.tuning.study import FailedTrialsIgnored

    study = optuna.create_study(direction="maximize",
                                pruner=FailedTrialsIgnored(search.make_pruner(parse_config({"data": {"path": "x"}}).tune)))
    study.enqueue_trial({}, user_attrs={"defaults": True})
    curves = {0: [0.5, 0.6, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8], 1: [0.55] + [0.9] * 8, 2: [0.6, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.85],
              3: [0.7, 0.7, 0.75, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8], 4: [0.45] + [0.9] * 8, 5: [0.8, 0.8, 0.6] + [0.9] * 6}
    stopped = {}
    for number, curve in curves.items():
        trial = study.ask()
        for step, value in enumerate(curve, start=1):  # as the search reports: the evaluation's number
            trial.report(value, step)
            if trial.should_prune():
                stopped[number] = step
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, curve[-1])
    # 1: above the defaults at evaluation 1, but only one other there; 2: best of 3 at evaluation 1, above the defaults
    # at 3 and 9, the first after them at both: goes on; 3: best of 4 at evaluation 1, below trial 2 at 3; 4: below
    # the top third at evaluation 1; 5: in the top two of 6 at evaluation 1, then last at 3
    assert stopped == {1: 1, 3: 3, 4: 1, 5: 3}
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "COMPLETE", "PRUNED", "PRUNED", "PRUNED"]
    assert isinstance(search.make_pruner(parse_config({"data": {"path": "x"}, "tune": {"pruning": False}}).tune),
                      optuna.pruners.NopPruner)


def test_two_workers_share_one_postgresql_study(base_config, write_csv, tmp_path, postgres_url):
    raw = _raw(base_config, write_csv, tmp_path, trials=4, pruning=False)  # every trial completes: counted below
    raw["train"]["epochs"] = 1  # most of each worker's time is its start-up: imports, data, audit
    cfg_path = tmp_path / "tune.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    workers = [subprocess.Popen([sys.executable, "-m", "tuneforge", "tune", str(cfg_path), "--storage", postgres_url,
                                 "--study", "shared", "--output", str(tmp_path / f"w{i}")],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name="shared", storage=postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    # every trial ran in exactly one of the two processes
    ran = [{int(p.name) for p in (tmp_path / f"w{i}" / "trials").glob("*") if (p / "history.json").is_file()}
           for i in range(2)]
    assert not ran[0] & ran[1] and ran[0] | ran[1] == {0, 1, 2, 3}
    finished = [i for i in range(2) if (tmp_path / f"w{i}" / "run.json").is_file()]
    assert finished  # the worker that finished the last trial wrote the run
    s = json.loads((tmp_path / f"w{finished[0]}" / "metrics.json").read_text())["search"]
    assert (s["trials"], s["complete"], s["trials_that_chose_it"]) == (4, 4, 4)


def test_trials_evaluate_eight_times_per_epoch_unless_the_config_says(base_config):
    """The pruner's clock is the evaluation's number: with train.eval_every 0 each trial evaluates every eighth of
    its own epoch (the batch size changes the steps, not the fraction); a config's eval_every, or
    evaluations_per_epoch null, keeps the run's cadence."""
    from tuneforge.tuning.search import trial_config_with_cadence

    cfg = parse_config(base_config("x.csv", train={"batch_size": 8, "eval_every": 0}))
    # 100 rows, batch 8: 13 steps per epoch -> every 2 steps; batch 4: 25 steps -> every 4
    assert trial_config_with_cadence(cfg, {}, 100).train.eval_every == 2
    assert trial_config_with_cadence(cfg, {"train.batch_size": 4}, 100).train.eval_every == 4
    assert trial_config_with_cadence(cfg, {"train.learning_rate": 1e-3}, 100).train.learning_rate == 1e-3
    own = parse_config(base_config("x.csv", train={"batch_size": 8, "eval_every": 5}))
    assert trial_config_with_cadence(own, {}, 100).train.eval_every == 5
    off = parse_config(base_config("x.csv", train={"eval_every": 0}) | {"tune": {"evaluations_per_epoch": None}})
    assert trial_config_with_cadence(off, {}, 100).train.eval_every == 0


def _search_json(out: Path, values: list[float]) -> None:
    """OUT/search.json of a finished 3-parameter study whose complete trials scored VALUES (no training)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, distribution_to_json

    dists = {"train.learning_rate": FloatDistribution(1e-3, 2e-2, log=True),
             "train.weight_decay": FloatDistribution(0.0, 0.1), "train.warmup_ratio": CategoricalDistribution([0.0, 0.06])}
    trials = []
    for i, v in enumerate(values):
        params = {"train.learning_rate": 1e-3 * (1.8 ** i), "train.weight_decay": 0.02 * i, "train.warmup_ratio": (0.0, 0.06)[i % 2]}
        trials.append({"number": i, "state": "COMPLETE", "value": v, "params": params,
                       "distributions": {k: distribution_to_json(d) for k, d in dists.items()},
                       "intermediate": [[3, v]], "duration_s": 1.0, "defaults": i == 0, "retry_of": None, "note": ""})
    best = max(trials, key=lambda t: t["value"])
    summary = {"study": "s", "storage": "sqlite:///x", "planned": len(values), "trials": len(values),
               "complete": len(values), "pruned": 0, "failed": 0, "trials_that_chose_it": len(values),
               "best_trial": best["number"], "best_value": best["value"], "best_params": best["params"],
               "defaults_trial": 0, "defaults_value": values[0], "defaults_params": trials[0]["params"],
               "chosen_by": "validation macro_f1", "direction": "maximize", "space": SPACE, "space_source": "tune.space",
               "sampler": "TPE", "seed": 13, "pruner": "halving", "finished": True}
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps({"summary": summary, "trials": trials}))


def test_search_report_plots_importances_when_trials_differ_and_says_why_not_when_they_tie(tmp_path):
    from tuneforge.tuning.report import search_section

    _search_json(tmp_path / "differ", [0.41, 0.55, 0.62, 0.48, 0.70])
    page = search_section(tmp_path / "differ")
    assert "optimisation history" in page and "parameter importances" in page and "parallel coordinates" in page
    assert "made no difference" not in page and "The config's own values were not beaten" not in page
    assert "best (trial 4)" in page

    _search_json(tmp_path / "tie", [0.3333, 0.3333, 0.3333])
    page = search_section(tmp_path / "tie")
    assert "optimisation history" in page and "parameter importances" not in page and "parallel coordinates" not in page
    assert "Every complete trial scored 0.3333: the values searched made no difference here" in page
