"""Causal-LM text scores, bootstrap CIs, closed-set detection and the TF-IDF retrieval baseline, on toy inputs."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tuneforge.tasks.causal_lm.metrics import (
    TfidfIndex,
    bootstrap_ci,
    chrf,
    class_metrics,
    closed_set,
    exact_match,
    normalise,
    per_example_scores,
    retrieval_baseline,
    rouge_l,
    score_generations,
)


def test_normalise_case_punctuation_whitespace_unicode():
    assert normalise("  Hello,   World! ") == "hello world"
    assert normalise("ｆｕｌｌ «bonjour» — the end…") == "full bonjour the end"  # NFKC, unicode P*, articles kept
    assert normalise("don't") == "dont"


def test_exact_match_ignores_case_punctuation_whitespace():
    assert exact_match("  The Answer: 42. ", "the answer 42") == 1.0
    assert exact_match("Yes!", "yes") == 1.0
    assert exact_match("yes", "no") == 0.0
    assert exact_match("a cat", "cat") == 0.0  # articles are not dropped


def test_rouge_l_known_values():
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)  # P=1, R=0.5
    assert rouge_l("The cat, sat.", "the cat sat") == pytest.approx(1.0)
    assert rouge_l("dog", "the cat") == 0.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("...", "") == 1.0  # empty after normalisation on both sides
    assert rouge_l("", "cat") == 0.0
    assert rouge_l("cat", "") == 0.0


def test_rouge_l_keeps_non_latin_tokens():
    assert rouge_l("日本 語", "日本 語") == 1.0
    assert rouge_l("日本", "日本 語") == pytest.approx(2 / 3)


def test_chrf_known_values():
    assert chrf("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert chrf("abc", "xyz") == 0.0
    assert chrf("", "") == 1.0
    assert chrf("", "abc") == 0.0
    # by hand: orders 1-2 effective; P = 1, R = (2/3 + 1/2) / 2 = 7/12; F2 = 5PR / (4P + R) = 7/11
    assert chrf("ab", "abc") == pytest.approx(7 / 11)


def test_chrf_closer_string_scores_higher():
    ref = "the quick brown fox"
    assert chrf("the quick brown dog", ref) > chrf("a slow red dog", ref) > 0.0


def test_per_example_scores_arrays():
    scores = per_example_scores(["Yes.", "the cat sat"], ["yes", "the cat sat on the mat"])
    assert set(scores) == {"exact_match", "rouge_l", "chrf"}
    np.testing.assert_allclose(scores["exact_match"], [1.0, 0.0])
    np.testing.assert_allclose(scores["rouge_l"], [1.0, 2 / 3])
    assert scores["chrf"].dtype == np.float64 and scores["chrf"].shape == (2,)
    with pytest.raises(ValueError, match="pair up"):
        per_example_scores(["a"], [])


def test_bootstrap_ci_constant_and_none():
    assert bootstrap_ci(np.full(5, 0.5), samples=200, seed=3) == {"low": 0.5, "high": 0.5}
    assert bootstrap_ci(np.array([0.0, 1.0]), samples=0, seed=0) is None
    assert bootstrap_ci(np.array([1.0]), samples=100, seed=0) is None


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = np.array([0, 1, 0, 1, 1, 0, 1, 1], dtype=float)
    ci = bootstrap_ci(values, samples=1000, seed=0)
    assert ci["low"] < values.mean() < ci["high"]
    assert 0.0 <= ci["low"] and ci["high"] <= 1.0
    assert bootstrap_ci(values, samples=1000, seed=0) == ci


def test_closed_set_detects_labels():
    train = ["yes", "no", "Yes.", " NO ", "no"]
    assert closed_set(train, ["yes", "no!", "Yes"]) == ["no", "yes"]


def test_closed_set_rejects_free_text_and_low_coverage():
    free = [f"answer number {i}" for i in range(30)]
    assert closed_set(free, free[:5]) is None  # more than max_classes distinct values
    assert closed_set(["yes", "no"], ["yes", "maybe", "no", "perhaps"]) is None  # coverage 0.5 < 0.9
    assert closed_set(["yes", "no"], ["yes"] * 9 + ["maybe"]) == ["no", "yes"]  # coverage 0.9 exactly
    assert closed_set(["a", "b", "c"], ["a"], max_classes=2) is None


def test_class_metrics_hand_computed():
    # normalised preds: yes, no, no, (other). yes: P=1 R=1/2 F=2/3; no: P=1/2 R=1/2 F=1/2; macro = 7/12
    result = class_metrics(["Yes.", "no", "no", "maybe"], ["yes", "yes", "no", "no"], ["no", "yes"])
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["macro_f1"] == pytest.approx(7 / 12)


def test_score_generations_keys_and_values():
    result = score_generations(["yes", "No", "yes"], ["yes", "yes", "yes"], ["no", "yes"], bootstrap_samples=50, seed=1)
    assert result["n"] == 3
    assert result["exact_match"] == pytest.approx(2 / 3)
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["macro_f1"] == pytest.approx(0.4)  # yes: F=0.8; no: F=0 (predicted, never true)
    assert set(result["ci"]) == {"exact_match", "rouge_l", "chrf"}
    per = per_example_scores(["yes", "No", "yes"], ["yes", "yes", "yes"])
    assert result["ci"]["rouge_l"] == bootstrap_ci(per["rouge_l"], 50, 1)
    plain = score_generations(["a"], ["a"], None, bootstrap_samples=50, seed=1)
    assert "accuracy" not in plain and plain["ci"]["chrf"] is None


def test_nearest_ordering_and_ties():
    index = TfidfIndex(["red apple pie", "red apple", "green pear"])
    assert index.nearest(["red apple"], k=3) == [[1, 0, 2]]
    assert index.nearest(["zebra"], k=2) == [[0, 1]]  # all similarities 0: lower index first
    tied = TfidfIndex(["alpha", "beta", "alpha"])
    assert tied.nearest(["alpha"], k=3) == [[0, 2, 1]]
    assert tied.nearest(["alpha"], k=5) == [[0, 2, 1]]  # k larger than the index


def test_nearest_exclude_self():
    index = TfidfIndex(["red apple pie", "red apple", "green pear"])
    assert index.nearest(["red apple"], k=2, exclude_self=True) == [[0, 2]]
    assert index.nearest(["red apples"], k=1, exclude_self=True) == [[1]]  # not identical: nothing dropped
    assert TfidfIndex(["alpha", "beta", "alpha"]).nearest(["alpha"], k=3, exclude_self=True) == [[1]]


def test_index_punctuation_only_prompts_fall_back_to_chars():
    index = TfidfIndex(["!!!", "???"])
    assert index.nearest(["!!!", "?"], k=2) == [[0, 1], [1, 0]]
    assert TfidfIndex(["", " "]).nearest(["x"], k=2) == [[0, 1]]


def test_retrieval_baseline_returns_nearest_completion():
    prompts = ["translate cat to french", "what is the capital of france", "add two and three"]
    completions = ["chat", "paris", "five"]
    tests = ["what is the capital city of france?", "add two and three please", "translate cat into french"]
    assert retrieval_baseline(prompts, completions, tests) == ["paris", "five", "chat"]


def test_no_torch_or_transformers_imported():
    code = ("import sys, tuneforge.tasks.causal_lm.metrics as m; m.rouge_l('a', 'a'); m.chrf('a', 'a'); "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
