"""Significance, calibration, slices and the promotion gate on cases with known answers; the report and
model card of a real (tiny) run."""
import json

import numpy as np
import pytest
import yaml
from scipy.stats import binomtest

from tuneforge.config import parse_config
from tuneforge.evaluation.gate import gate
from tuneforge.tasks.classification.stats import calibration, mcnemar, paired_bootstrap, slice_metrics
from tuneforge.tasks.classification.labels import LabelSpace

SPACE = LabelSpace(("a", "b"), False)


def test_mcnemar_known_answer():
    y = np.ones(30, dtype=int)
    model = np.ones(30, dtype=int)
    base = model.copy()
    base[:10] = 0  # the baseline is wrong on 10 rows the model gets right, never the other way
    r = mcnemar(SPACE, y, model, base)
    assert (r["only_model_right"], r["only_baseline_right"]) == (10, 0)
    assert r["p_value"] == pytest.approx(2 * 0.5**10)
    assert mcnemar(SPACE, y, model, model)["p_value"] == 1.0
    # both kinds of disagreement: 12 rows only the model gets right, 4 only the baseline; scipy's exact two-sided
    # binomial p-value for 12 of 16 (hand check: 2 * sum(C(16, k), k = 12..16) / 2**16 = 2 * 2517 / 65536)
    y = np.zeros(40, dtype=int)
    model, base = np.zeros(40, dtype=int), np.zeros(40, dtype=int)
    base[:12] = 1  # rows 0-11: only the model right
    model[12:16] = 1  # rows 12-15: only the baseline right
    model[16:20] = base[16:20] = 1  # rows 16-19: both wrong; rows 20-39: both right
    mixed = mcnemar(SPACE, y, model, base)
    assert (mixed["only_model_right"], mixed["only_baseline_right"]) == (12, 4)
    assert mixed["p_value"] == pytest.approx(binomtest(12, 16, 0.5).pvalue) == pytest.approx(2 * 2517 / 65536)


def test_paired_bootstrap_known_answers():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    same = paired_bootstrap(SPACE, "accuracy", y, y, y, samples=200)
    assert same["diff"] == same["low"] == same["high"] == 0
    better = paired_bootstrap(SPACE, "accuracy", y, y, 1 - y, samples=200)
    assert better["diff"] == 1 and better["low"] == 1 and better["p_value"] == 0


def test_calibration_known_answers():
    y = np.array([0] * 8 + [1] * 2)
    probs = np.tile([0.8, 0.2], (10, 1))  # says 80% sure of class a, right 80% of the time
    assert calibration(SPACE, y, probs)["ece"] == pytest.approx(0.0)
    over = calibration(SPACE, np.array([0, 1] * 5), np.tile([1.0, 0.0], (10, 1)))
    assert over["ece"] == pytest.approx(0.5)
    assert sum(over["confidence_histogram"]["counts"]) == 10
    # three bins, by hand: 4 rows at 0.93 confidence, 3 right (gap 0.18); 4 at 0.67, 2 right (gap 0.17);
    # 2 at 0.57 for class b, both right (gap 0.43): ECE = 0.4 * 0.18 + 0.4 * 0.17 + 0.2 * 0.43 = 0.226
    probs = np.array([[0.93, 0.07]] * 4 + [[0.67, 0.33]] * 4 + [[0.43, 0.57]] * 2)
    y = np.array([0, 0, 0, 1] + [0, 0, 1, 1] + [1, 1])
    mixed = calibration(SPACE, y, probs)
    assert mixed["ece"] == pytest.approx(0.226)
    filled = {(round(b["low"], 1), b["n"], b["accuracy"]) for b in mixed["bins"] if b["n"]}
    assert filled == {(0.9, 4, 0.75), (0.6, 4, 0.5), (0.5, 2, 1.0)}
    counts = mixed["confidence_histogram"]["counts"]  # 20 bins of 0.05
    assert (counts[18], counts[13], counts[11], sum(counts)) == (4, 4, 2, 10)


def test_slices_on_a_hand_built_table():
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    pred = np.array([0, 1, 0, 1, 1, 0, 0, 1])  # group x all right; group y right on 2 of 4
    groups = ["x", "x", "x", "x", "y", "y", "y", "y"]
    s = slice_metrics(SPACE, "accuracy", y, pred, groups, max_gap=0.1, min_rows=2)
    assert s["groups"]["x"]["accuracy"] == 1.0 and s["groups"]["y"]["accuracy"] == 0.5
    assert s["largest_gap"] == pytest.approx(0.5) and s["between"] == {"best": "x", "worst": "y"} and s["warning"]
    few = slice_metrics(SPACE, "accuracy", y, pred, groups, max_gap=0.1, min_rows=5)
    assert few["largest_gap"] == 0 and few["small_groups"] == ["x", "y"] and not few["warning"]


def _result(model_f1, low, base_f1):
    return {"test": {"model": {"macro_f1": model_f1, "ci": {"low": low, "high": model_f1 + 0.02}},
                     "baselines": {"tfidf_logreg": {"macro_f1": base_f1}}}, "best_baseline": "tfidf_logreg"}


def test_gate_pass_and_fail():
    cfg = parse_config({"data": {"path": "x"}, "eval": {"gate": {"min_margin": 0.01, "ci_lower_above_baseline": True}}})
    assert gate(_result(0.85, 0.82, 0.80), cfg, "max")["promoted"] is True
    small = gate(_result(0.805, 0.79, 0.80), cfg, "max")
    assert small["promoted"] is False and "less than the required" in small["promotion_reason"]
    wide = gate(_result(0.83, 0.79, 0.80), cfg, "max")
    assert wide["promoted"] is False and "lower bound" in wide["promotion_reason"]
    lenient = parse_config({"data": {"path": "x"}, "eval": {"gate": {"min_margin": 0.0, "ci_lower_above_baseline": False}}})
    assert gate(_result(0.805, 0.70, 0.80), lenient, "max")["promoted"] is True


def test_gate_reads_the_metrics_direction_from_the_task_spec():
    """Perplexity: lower is better (the causal LM's spec says so), so the best baseline is the lowest and the
    model clears it by being lower, its CI's upper bound below it too."""
    from tuneforge.evaluation.gate import judge
    from tuneforge.tasks import get_spec

    cfg = parse_config({"data": {"path": "x"}})
    direction = get_spec("causal-lm").direction("perplexity")
    assert direction == "min" and get_spec("text-classification").direction("macro_f1") == "max"
    result = {"main_metric": "perplexity",
              "test": {"model": {"perplexity": 12.0, "ci": {"low": 11.0, "high": 13.0}},
                       "baselines": {"base_zero_shot": {"perplexity": 30.0}, "retrieval": {"perplexity": 20.0}}}}
    judged = judge(result, cfg, direction)
    assert judged["best_baseline"] == "retrieval" and judged["beats_baselines"] is True and judged["promoted"] is True
    assert "upper bound is below it" in judged["promotion_reason"]
    worse = judge({**result, "test": {**result["test"], "model": {"perplexity": 21.0, "ci": {"low": 19, "high": 23}}}},
                  cfg, direction)
    assert worse["beats_baselines"] is False and worse["promoted"] is False


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    from conftest import make_rows
    import pandas as pd

    from tuneforge.pipeline import run

    d = tmp_path_factory.mktemp("run")
    pd.DataFrame(make_rows(120)).to_csv(d / "data.csv", index=False)
    cfg = parse_config({
        "data": {"path": str(d / "data.csv"), "val_fraction": 0.2, "test_fraction": 0.3},
        "model": {"name": str(tiny_model_dir), "max_length": 32},
        "train": {"method": "full", "epochs": 4, "batch_size": 8, "learning_rate": 5e-3, "eval_every": 3},
        "eval": {"bootstrap_samples": 100, "slices": ["topic"], "slice_min_rows": 3},
        "output": {"dir": str(d / "out")},
    })
    metrics = run(cfg)
    return d / "out", metrics


def test_run_records_slices_significance_calibration_and_gate(finished_run):
    out, metrics = finished_run
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["slices"]["topic"]["groups"]) == {"a", "b"}
    assert sum(g["n"] for g in saved["slices"]["topic"]["groups"].values()) == saved["test"]["model"]["n"]
    model, baselines, n = saved["test"]["model"], saved["test"]["baselines"], saved["test"]["model"]["n"]
    best = saved["best_baseline"]
    assert best == max(baselines, key=lambda b: baselines[b]["macro_f1"])
    assert saved["significance"]["against"] == best

    # McNemar: the discordant counts explain the accuracy gap on the test split, and the p-value is scipy's exact test
    mc = saved["significance"]["mcnemar"]
    only_model, only_base = mc["only_model_right"], mc["only_baseline_right"]
    assert (only_model - only_base) / n == pytest.approx(model["accuracy"] - baselines[best]["accuracy"])
    expected_p = 1.0 if only_model + only_base == 0 else binomtest(only_model, only_model + only_base, 0.5).pvalue
    assert mc["p_value"] == pytest.approx(expected_p)

    # calibration: the bins hold every test row, their accuracy is the model's test accuracy, ECE is their weighted gap
    cal = saved["calibration"]
    filled = [b for b in cal["bins"] if b["n"]]
    assert sum(b["n"] for b in filled) == n == sum(cal["confidence_histogram"]["counts"])
    assert sum(b["n"] * b["accuracy"] for b in filled) / n == pytest.approx(model["accuracy"])
    assert all(b["low"] <= b["confidence"] <= b["high"] for b in filled)
    assert cal["ece"] == pytest.approx(sum(b["n"] / n * abs(b["confidence"] - b["accuracy"]) for b in filled))

    # the gate (defaults: beat the best baseline's macro-F1 by 0.01, the CI's lower bound above it), from the saved numbers
    base = baselines[best]["macro_f1"]
    assert saved["promoted"] is (model["macro_f1"] - base >= 0.01 and model["ci"]["low"] > base)
    assert saved["promotion_reason"] == gate(saved, parse_config(yaml.safe_load((out / "config.yaml").read_text())), "max")["promotion_reason"]


def test_model_card_metadata_parses(finished_run):
    out, metrics = finished_run
    text = (out / "model" / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["pipeline_tag"] == "text-classification" and meta["library_name"] == "transformers"
    assert meta["base_model"] and meta["tuneforge"]["promoted"] == metrics["promoted"]
    values = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert values["accuracy"] == pytest.approx(metrics["test"]["model"]["accuracy"], abs=1e-4)
    assert "## How to load" in text and "## Limitations" in text and "slice" in text.lower()


def test_report_is_self_contained_and_rebuilt_from_stored_results(finished_run):
    from tuneforge.cli import main

    out, _ = finished_run
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 5 and "http://" not in page and "https://" not in page
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").read_text().count("<img") == page.count("<img")


def test_missing_slice_column_is_a_clear_error(tmp_path, base_config, write_csv, capsys):
    from conftest import make_rows

    from tuneforge.errors import DataError
    from tuneforge.pipeline import run

    cfg = parse_config(base_config(write_csv(make_rows(40)), eval={"slices": ["region"]}))
    with pytest.raises(DataError, match="slice column 'region' not found") as err:
        run(cfg)
    assert "eval.slices" in err.value.fix


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not __import__("os").path.exists(CHROMIUM), reason="Debian chromium not installed (.ci/run installs it)")
def test_report_renders_in_a_real_browser(finished_run):
    from playwright.sync_api import sync_playwright

    out, _ = finished_run
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto((out / "report.html").resolve().as_uri())
        sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.getBoundingClientRect().height])")
        page.screenshot(path=str(out / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert len(sizes) >= 5 and all(done and width > 100 and height > 50 for done, width, height in sizes)
