"""Entity metrics (strict IOB2), the sentence bootstrap, type confusion and the token-classification baselines."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from tuneforge.tasks.token_classification import baselines
from tuneforge.tasks.token_classification.metrics import (
    bootstrap_f1_ci, entity_metrics, f1_from_counts, sentence_counts, type_confusion)
from tuneforge.tasks.token_classification.sentence import Sentence

TYPES = ("PER", "LOC", "ORG")


def _normalise(tags: list[str]) -> list[str]:
    """Valid BIO: an I-X not preceded by B-X/I-X becomes B-X."""
    out = []
    for i, t in enumerate(tags):
        if t.startswith("I-") and (i == 0 or out[i - 1] == "O" or out[i - 1][2:] != t[2:]):
            t = "B-" + t[2:]
        out.append(t)
    return out


def _random_tag(rng: random.Random) -> str:
    prefix = rng.choice(["O", "O", "O", "B-", "I-"])
    return prefix if prefix == "O" else prefix + rng.choice(TYPES)


def _random_tags(rng: random.Random, n: int) -> list[str]:
    return _normalise([_random_tag(rng) for _ in range(n)])


def _perturb(rng: random.Random, tags: list[str]) -> list[str]:
    """A prediction near the gold: most tags kept, some changed to a random tag, then made valid BIO."""
    if rng.random() < 0.3:
        return list(tags)
    out = list(tags)
    for i in range(len(out)):
        if rng.random() < 0.2:
            out[i] = _random_tag(rng)
    return _normalise(out)


def _random_case(seed: int, n: int = 200) -> tuple[list[list[str]], list[list[str]]]:
    rng = random.Random(seed)
    gold = [_random_tags(rng, rng.randint(1, 15)) for _ in range(n)]
    pred = [_perturb(rng, g) for g in gold]
    return gold, pred


# Two gold entities: PER found exactly, LOC predicted with the wrong type (ORG).
HAND_GOLD = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "O"]]
HAND_PRED = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "O"]]


# ------------------------------------------------------------------------------------------ metrics

def test_entity_metrics_hand_case():
    m = entity_metrics(HAND_GOLD, HAND_PRED)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)
    assert m["n_sentences"] == 2 and m["n_entities"] == 2
    assert m["per_type"] == {
        "LOC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "ORG": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0},
        "PER": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
    }
    counts = sentence_counts(HAND_GOLD, HAND_PRED)
    assert counts.tolist() == [[1, 2, 2], [0, 0, 0]]
    assert f1_from_counts(counts) == pytest.approx(0.5)


def test_entity_metrics_strict_boundaries_and_empty():
    # a span one token short is wrong in strict mode; precision 0/1, recall 0/1
    m = entity_metrics([["B-PER", "I-PER", "O"]], [["B-PER", "O", "O"]])
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    # an I- tag with no B- before it is no entity (strict IOB2), in seqeval and in sentence_counts alike
    m = entity_metrics([["B-LOC", "O"]], [["B-LOC", "I-PER"]])
    assert m["f1"] == pytest.approx(1.0)
    assert sentence_counts([["B-LOC", "O"]], [["B-LOC", "I-PER"]]).tolist() == [[1, 1, 1]]
    m = entity_metrics([["O", "O"]], [["O", "O"]])
    assert m == {"f1": 0.0, "precision": 0.0, "recall": 0.0, "per_type": {}, "n_sentences": 1, "n_entities": 0}
    assert f1_from_counts(sentence_counts([["O"]], [["O"]])) == 0.0
    assert f1_from_counts(np.zeros((0, 3))) == 0.0


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        sentence_counts([["O", "O"]], [["O"]])
    with pytest.raises(ValueError):
        entity_metrics([["O"]], [["O"], ["O"]])


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_counts_f1_equals_seqeval_strict(seed):
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2

    gold, pred = _random_case(seed)
    counts = sentence_counts(gold, pred)
    assert counts.shape == (200, 3)
    assert (counts[:, 0] <= counts[:, 1:].min(axis=1)).all()
    expected = f1_score(gold, pred, mode="strict", scheme=IOB2, zero_division=0)
    ours = f1_from_counts(counts)
    assert 0.2 < ours < 0.95  # a meaningful case: neither trivial nor perfect
    assert ours == pytest.approx(expected, abs=1e-12)
    m = entity_metrics(gold, pred)
    assert m["f1"] == pytest.approx(expected, abs=1e-12)
    assert m["n_entities"] == int(counts[:, 2].sum())
    assert sum(t["support"] for t in m["per_type"].values()) == m["n_entities"]


def test_type_confusion_hand_case():
    gold = HAND_GOLD + [["B-PER", "O", "O", "O"], ["B-LOC", "I-LOC", "O"], ["B-MISC", "O"], ["O", "B-LOC", "O", "O"]]
    pred = HAND_PRED + [["O", "O", "B-LOC", "O"], ["B-LOC", "O", "O"], ["B-PER", "O"], ["O", "B-LOC", "O", "B-ORG"]]
    # sentence 0: PER->PER, LOC->ORG; 2: PER missed + a spurious LOC; 3: LOC missed (the prediction is one token
    # short) + that LOC spurious; 4: MISC->PER (MISC is never predicted); 5: LOC->LOC + a spurious ORG
    tc = type_confusion(gold, pred)
    assert tc["rows"] == ["LOC", "MISC", "PER", "(none)"]       # gold types
    assert tc["columns"] == ["LOC", "ORG", "PER", "(missed)"]   # predicted types
    assert tc["matrix"] == [
        # LOC ORG PER (missed)
        [1, 1, 0, 1],  # LOC
        [0, 0, 1, 0],  # MISC
        [0, 0, 1, 1],  # PER
        [2, 1, 0, 0],  # (none): spurious predictions, by predicted type
    ]
    assert tc["spurious"] == {"LOC": 2, "ORG": 1}
    _check_confusion(gold, pred, tc)
    from tuneforge.tasks.token_classification.report import report_details

    html = "".join(report_details({"test": {"model": {"per_type": {}}}, "type_confusion": tc}))  # 4 x 4, not square
    assert "<img" in html and "confusion of entity types" in html
    tc = type_confusion(gold[:3], pred[:3])  # 2 gold types x 3 predicted ones: the plot draws rows x columns
    assert (tc["rows"], tc["columns"]) == (["LOC", "PER", "(none)"], ["LOC", "ORG", "PER", "(missed)"])
    assert "<img" in "".join(report_details({"test": {"model": {"per_type": {}}}, "type_confusion": tc}))


def _check_confusion(gold, pred, tc):
    """Rows sum to the gold entities of their type, columns to the predicted ones; so no type row or column is
    empty, and only the cell ((none), (missed)) is zero by construction."""
    from tuneforge.tasks.token_classification.sentence import entities

    matrix = np.array(tc["matrix"])
    assert matrix.shape == (len(tc["rows"]), len(tc["columns"]))
    gold_counts = Counter(k for g in gold for k, _, _ in entities(g))
    pred_counts = Counter(k for p in pred for k, _, _ in entities(p))
    assert dict(zip(tc["rows"][:-1], matrix[:-1].sum(axis=1).tolist())) == gold_counts
    assert dict(zip(tc["columns"][:-1], matrix[:, :-1].sum(axis=0).tolist())) == pred_counts
    assert (matrix[:-1].sum(axis=1) > 0).all() and (matrix[:, :-1].sum(axis=0) > 0).all()
    assert matrix[-1, -1] == 0
    assert dict(zip(tc["columns"][:-1], matrix[-1, :-1].tolist())) == {k: tc["spurious"].get(k, 0) for k in pred_counts}
    return matrix


def test_no_row_or_column_of_the_type_confusion_is_always_zero():
    nonzero_rows, nonzero_columns = set(), set()
    for seed in range(40):  # small cases too, whose gold and predicted types differ
        gold, pred = _random_case(seed, n=200 if seed % 4 == 0 else 3)
        if not any(k for g in gold + pred for k in g if k != "O"):
            continue
        tc = type_confusion(gold, pred)
        matrix = _check_confusion(gold, pred, tc)
        nonzero_rows |= {r for r, total in zip(tc["rows"], matrix.sum(axis=1)) if total}
        nonzero_columns |= {c for c, total in zip(tc["columns"], matrix.sum(axis=0)) if total}
    assert nonzero_rows == {*TYPES, "(none)"} and nonzero_columns == {*TYPES, "(missed)"}


def test_bootstrap_ci_contains_point_and_is_deterministic():
    gold, pred = _random_case(7)
    counts = sentence_counts(gold, pred)
    point = f1_from_counts(counts)
    ci = bootstrap_f1_ci(counts, samples=500, seed=3)
    assert set(ci) == {"metric", "level", "low", "high", "samples"}
    assert ci["metric"] == "f1" and ci["level"] == 0.95 and ci["samples"] == 500
    assert ci["low"] < point < ci["high"]
    assert ci["high"] - ci["low"] < 0.2
    assert bootstrap_f1_ci(counts, samples=500, seed=3) == ci
    assert bootstrap_f1_ci(counts, samples=500, seed=4) != ci
    wider = bootstrap_f1_ci(counts, samples=500, seed=3, level=0.99)
    assert wider["low"] <= ci["low"] and wider["high"] >= ci["high"]
    assert bootstrap_f1_ci(counts, samples=0) is None
    assert bootstrap_f1_ci(np.zeros((0, 3), dtype=np.int64)) is None
    # a perfect prediction: the interval collapses on 1
    perfect = bootstrap_f1_ci(sentence_counts(gold, gold), samples=100)
    assert perfect["low"] == perfect["high"] == 1.0


# ---------------------------------------------------------------------------------------- baselines

def _sent(text: str, tags: str | None = None) -> Sentence:
    tokens = text.split()
    return Sentence(tokens=tokens, tags=tags.split() if tags else ["O"] * len(tokens))


def test_majority_all_o_and_f1_zero():
    test = [_sent("Mr Smith went to Paris", "O B-PER O O B-LOC"), _sent("hello", "O"), _sent("", "")]
    pred = baselines.majority(test)
    assert pred == [["O"] * 5, ["O"], []]
    m = entity_metrics([s.tags for s in test], pred)
    assert m["f1"] == 0.0 and m["n_entities"] == 2


def test_gazetteer_longest_first_no_overlap_and_case():
    train = [
        _sent("I love New York", "O O B-LOC I-LOC"),
        _sent("York said no", "B-PER O O"),
        _sent("York agreed", "B-PER O"),
        _sent("the York City office", "O B-ORG I-ORG O"),
        _sent("Jordan is far", "B-LOC O O"),
        _sent("Jordan again", "B-LOC O"),
        _sent("Jordan scored", "B-PER O"),
        _sent("May arrived", "B-PER O"),
    ]
    test = [
        _sent("we flew to New York today"),
        _sent("York replied"),
        _sent("New York City is big"),  # "New York" wins at "New"; "City" alone is no entry: no overlap
        _sent("NEW YORK and new york"),  # case-insensitive only for spans with a capital
        _sent("it may rain in Jordan"),
        _sent("New"),
        _sent("York City hall"),  # "York City" (ORG) before "York" alone (PER)
    ]
    pred = baselines.gazetteer(train, test)
    assert pred == [
        ["O", "O", "O", "B-LOC", "I-LOC", "O"],
        ["B-PER", "O"],
        ["B-LOC", "I-LOC", "O", "O", "O"],
        ["B-LOC", "I-LOC", "O", "O", "O"],
        ["O", "O", "O", "O", "B-LOC"],  # Jordan: LOC 2x vs PER 1x; "may" lower-case never matches "May"
        ["O"],
        ["B-ORG", "I-ORG", "O"],
    ]
    assert baselines.gazetteer([], test) == baselines.majority(test)


_SYL = "ka lo mi ren tas vo bel dun sor pi gar lin mex tu ros fen".split()


def _name(rng: random.Random) -> str:
    return "".join(rng.sample(_SYL, rng.randint(2, 3))).capitalize()


def _toy_ner(n: int, names: list[str], rng: random.Random) -> list[Sentence]:
    """Capitalised words after "in" are LOC, after "Mr" are PER; other capitalised words (sentence starts,
    weekdays) are O, so capitalisation alone is not enough."""
    out = []
    fillers = "we met yesterday and then went home quickly with friends".split()
    for _ in range(n):
        toks, tags = [rng.choice(["Then", "Later", "Today", "We"])], ["O"]
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(["PER", "LOC", "O"])
            toks += rng.sample(fillers, rng.randint(1, 3))
            tags += ["O"] * (len(toks) - len(tags))
            if kind == "PER":
                toks += ["Mr", rng.choice(names)]
                tags += ["O", "B-PER"]
            elif kind == "LOC":
                toks += ["in", rng.choice(names)]
                tags += ["O", "B-LOC"]
            else:
                toks += ["on", rng.choice(["Monday", "Friday", "Sunday"])]
                tags += ["O", "O"]
        out.append(Sentence(tokens=toks, tags=tags))
    return out


def test_crf_learns_context_for_unseen_names():
    rng = random.Random(0)
    names = sorted({_name(rng) for _ in range(200)})
    train_names, test_names = names[: len(names) // 2], names[len(names) // 2:]
    train = _toy_ner(300, train_names, rng)
    test = _toy_ner(100, test_names, rng)
    assert not {t for s in test for t in s.tokens} & set(train_names)
    pred = baselines.crf(train, test, seed=0)
    assert [len(p) for p in pred] == [len(s) for s in test]
    gold = [s.tags for s in test]
    m = entity_metrics(gold, pred)
    assert m["n_entities"] > 50
    assert m["f1"] >= 0.9
    # the gazetteer only knows training names, so it finds none of the test ones
    assert entity_metrics(gold, baselines.gazetteer(train, test))["f1"] == 0.0
    # deterministic whatever the seed; empty sentences and entity-free training are handled
    assert baselines.crf(train, test[:10], seed=1) == pred[:10]
    assert baselines.crf(train, [_sent("")]) == [[]]
    assert baselines.crf([_sent("no names here")], test[:2]) == baselines.majority(test[:2])


def test_counts_f1_equals_seqeval_on_unnormalised_tags():
    """Orphan I- tags (no B- before them) are read the same way by both: they start no entity."""
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2

    rng = random.Random(11)
    gold = [[_random_tag(rng) for _ in range(rng.randint(1, 12))] for _ in range(200)]
    pred = [[t if rng.random() < 0.7 else _random_tag(rng) for t in s] for s in gold]
    assert any(s[0].startswith("I-") for s in gold + pred)
    expected = f1_score(gold, pred, mode="strict", scheme=IOB2, zero_division=0)
    assert f1_from_counts(sentence_counts(gold, pred)) == pytest.approx(expected, abs=1e-12)
