"""Scores for generated text against reference completions (exact match, ROUGE-L, chrF, bootstrap CIs,
accuracy/macro-F1 when the completions are really labels) and a TF-IDF nearest-prompt retrieval baseline.

Pure Python + numpy + scikit-learn (+ rouge-score, sacrebleu); no torch, no transformers.
"""
from __future__ import annotations

import functools
import string
import unicodedata

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import f1_score

_ASCII_PUNCT = frozenset(string.punctuation)
_OTHER = "(other)"  # label for a prediction outside the closed set; normalise() can never produce it
_CHUNK_CELLS = 4_000_000  # cap on the floats held at once by a (rows x columns) block, in bootstrap and nearest


# ---------------------------------------------------------------- text scores

def normalise(text: str) -> str:
    """SQuAD-style normalisation, articles kept: NFKC, lowercase, punctuation removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(c for c in text if c not in _ASCII_PUNCT and not unicodedata.category(c).startswith("P"))
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the two texts are equal after normalise(), else 0.0."""
    return 1.0 if normalise(pred) == normalise(ref) else 0.0


class _NormalisedTokens:
    """Tokenizer for rouge-score: normalise(text).split(). Replaces rouge-score's default tokenizer, which
    keeps only [a-z0-9] and so scores two identical non-Latin texts (Chinese, Greek, ...) as 0."""

    def tokenize(self, text: str) -> list[str]:
        return normalise(text).split()


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imported on first use: needs nltk, absl-py, six

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_NormalisedTokens())


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure (token LCS) via rouge-score, on normalise(x).split() tokens, no stemming.
    Both empty (after normalisation) -> 1.0; one empty -> 0.0."""
    p, r = normalise(pred), normalise(ref)
    if not p or not r:
        return 1.0 if p == r else 0.0
    return float(_rouge_scorer().score(r, p)["rougeL"].fmeasure)


@functools.lru_cache(maxsize=1)
def _chrf_metric():
    from sacrebleu.metrics import CHRF  # imported on first use: needs portalocker, regex, tabulate, colorama, lxml

    return CHRF()


def chrf(pred: str, ref: str) -> float:
    """Sentence chrF of sacreBLEU's default CHRF (char n-grams 1-6, beta 2, whitespace ignored, case kept)
    on a 0-1 scale. Both texts blank -> 1.0 (sacreBLEU itself says 0)."""
    if not pred.strip() and not ref.strip():
        return 1.0
    return float(_chrf_metric().sentence_score(pred, [ref]).score) / 100.0


def _check_pairs(preds: list[str], refs: list[str]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references; they must pair up one to one")


def per_example_scores(preds: list[str], refs: list[str]) -> dict[str, np.ndarray]:
    """Each text score per example, as float arrays keyed "exact_match", "rouge_l", "chrf"."""
    _check_pairs(preds, refs)
    scores = {"exact_match": exact_match, "rouge_l": rouge_l, "chrf": chrf}
    return {name: np.array([fn(p, r) for p, r in zip(preds, refs)], dtype=np.float64)
            for name, fn in scores.items()}


# ---------------------------------------------------------------- statistics

def bootstrap_ci(values: np.ndarray, samples: int, seed: int) -> dict | None:
    """95% percentile-bootstrap interval of the mean over examples; None when samples == 0 or fewer than 2 values.
    Resamples are drawn in blocks (same numbers for the same seed and length) to bound memory."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if samples <= 0 or n < 2:
        return None
    rng = np.random.default_rng(seed)
    block = max(1, _CHUNK_CELLS // n)
    means = np.concatenate([values[rng.integers(0, n, size=(min(block, samples - start), n))].mean(axis=1)
                            for start in range(0, samples, block)])
    low, high = np.quantile(means, [0.025, 0.975])
    return {"low": float(low), "high": float(high)}


def closed_set(train_completions: list[str], test_completions: list[str], max_classes: int = 20,
               min_share: float = 0.9) -> list[str] | None:
    """The sorted distinct normalised training completions when they are at most `max_classes` values and cover
    at least `min_share` of the normalised test completions (the completions are labels); else None."""
    classes = {normalise(c) for c in train_completions}
    if not classes or len(classes) > max_classes or not test_completions:
        return None
    covered = sum(normalise(c) in classes for c in test_completions) / len(test_completions)
    return sorted(classes) if covered >= min_share else None


def class_metrics(preds: list[str], refs: list[str], classes: list[str]) -> dict:
    """Accuracy and macro-F1 over `classes` on normalised strings; a prediction outside the set is wrong."""
    _check_pairs(preds, refs)
    if not classes:
        raise ValueError("class_metrics needs at least one class")
    labels = set(classes)
    y_pred = [p if p in labels else _OTHER for p in map(normalise, preds)]
    y_true = [normalise(r) for r in refs]
    accuracy = float(np.mean([p == t for p, t in zip(y_pred, y_true)])) if y_true else float("nan")
    macro = f1_score(y_true, y_pred, labels=list(classes), average="macro", zero_division=0) if y_true else float("nan")
    return {"accuracy": accuracy, "macro_f1": float(macro)}


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def score_generations(preds: list[str], refs: list[str], classes: list[str] | None, bootstrap_samples: int,
                      seed: int) -> dict:
    """Mean text scores, their bootstrap CIs (one seed for all), n, and accuracy/macro-F1 when `classes` is given.
    With no examples the means are NaN and the CIs None."""
    per = per_example_scores(preds, refs)
    result: dict = {name: _mean(v) for name, v in per.items()}
    result["ci"] = {name: bootstrap_ci(v, bootstrap_samples, seed) for name, v in per.items()}
    result["n"] = len(preds)
    if classes is not None:
        result.update(class_metrics(preds, refs, classes))
    return result


# ---------------------------------------------------------------- retrieval baseline

def _fit_vectorizer(prompts: list[str]):
    """Word 1-2-gram TF-IDF; char_wb 2-4 grams when the prompts have no word tokens; None when neither has any."""
    for kwargs in ({"ngram_range": (1, 2)}, {"analyzer": "char_wb", "ngram_range": (2, 4)}):
        vectorizer = TfidfVectorizer(sublinear_tf=True, min_df=1, **kwargs)
        try:
            return vectorizer, vectorizer.fit_transform(prompts)
        except ValueError:  # "empty vocabulary": every prompt is punctuation, blank, ...
            continue
    return None, None


class TfidfIndex:
    """Cosine nearest neighbours among training prompts on TF-IDF vectors (rows are L2-normalised)."""

    def __init__(self, train_prompts: list[str]):
        self.train_prompts = list(train_prompts)
        self._positions: dict[str, list[int]] = {}
        for i, prompt in enumerate(self.train_prompts):
            self._positions.setdefault(prompt, []).append(i)
        self._vectorizer, self._matrix = _fit_vectorizer(self.train_prompts) if self.train_prompts else (None, None)

    def _similarity(self, queries: list[str]) -> np.ndarray:
        if self._vectorizer is None:  # no usable features: every prompt is equally (un)similar
            return np.zeros((len(queries), len(self.train_prompts)))
        return (self._vectorizer.transform(queries) @ self._matrix.T).toarray()

    def nearest(self, queries: list[str], k: int, exclude_self: bool = False) -> list[list[int]]:
        """Per query, the indices of the k most similar training prompts, most similar first, ties to the lower
        index. exclude_self drops every training prompt identical to the query (leave-one-out on train)."""
        n = len(self.train_prompts)
        if k <= 0 or n == 0:
            return [[] for _ in queries]
        block = max(1, _CHUNK_CELLS // n)
        out: list[list[int]] = []
        for start in range(0, len(queries), block):
            chunk = list(queries[start:start + block])
            out.extend(self._nearest_block(chunk, self._similarity(chunk), k, exclude_self))
        return out

    def _nearest_block(self, queries: list[str], sim: np.ndarray, k: int, exclude_self: bool) -> list[list[int]]:
        rows = []
        for query, row in zip(queries, sim):
            order = np.argsort(-row, kind="stable")
            if exclude_self and query in self._positions:
                drop = set(self._positions[query])
                order = [i for i in order[:k + len(drop)] if i not in drop]
            rows.append([int(i) for i in order[:k]])
        return rows


def retrieval_baseline(train_prompts: list[str], train_completions: list[str], test_prompts: list[str]) -> list[str]:
    """The completion of the single most similar training prompt (TF-IDF cosine), per test prompt."""
    if len(train_prompts) != len(train_completions):
        raise ValueError(f"{len(train_prompts)} training prompts but {len(train_completions)} completions")
    if not train_prompts:
        raise ValueError("retrieval_baseline needs at least one training prompt")
    return [train_completions[row[0]] for row in TfidfIndex(train_prompts).nearest(test_prompts, k=1)]
