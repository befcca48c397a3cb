"""Generation scores per example: ROUGE-1/2/L/Lsum (rouge-score, on the same normalised tokens as the causal LM's
ROUGE-L: case, punctuation and accents of other scripts handled alike), chrF and exact match (the causal LM's), and
their means with bootstrap 95% CIs. No torch."""
from __future__ import annotations

import functools
import re

import numpy as np

from tuneforge.tasks.causal_lm.metrics import bootstrap_ci, chrf, exact_match, normalise
from tuneforge.tasks.seq2seq.spec import TEXT_METRICS

_ROUGE = {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_l": "rougeL", "rouge_lsum": "rougeLsum"}
# a sentence ends at . ! ? (and closing quotes or brackets after them) followed by white space
_SENTENCE_END = re.compile(r"([.!?][\"')\]]*)\s+")


class _NormalisedTokens:
    """rouge-score's tokenizer: normalise(text).split() (its default keeps [a-z0-9] only, scoring two equal Greek texts 0)."""

    def tokenize(self, text: str) -> list[str]:
        return normalise(text).split()


@functools.lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(_ROUGE.values()), use_stemmer=False, tokenizer=_NormalisedTokens())


def sentence_lines(text: str) -> str:
    """The text with one sentence per line, as ROUGE-Lsum reads summaries; a text with line breaks keeps its own."""
    if "\n" in text.strip():
        return "\n".join(line for line in text.splitlines() if line.strip())
    return _SENTENCE_END.sub(r"\1\n", text.strip())


def rouge(pred: str, ref: str) -> dict[str, float]:
    """ROUGE-1, -2, -L and -Lsum F-measures. Both empty (after normalisation) -> 1.0; one empty -> 0.0."""
    p, r = normalise(pred), normalise(ref)
    if not p or not r:
        value = 1.0 if p == r else 0.0
        return {k: value for k in _ROUGE}
    scores = _scorer().score(sentence_lines(ref), sentence_lines(pred))
    return {k: float(scores[name].fmeasure) for k, name in _ROUGE.items()}


def per_example(preds: list[str], refs: list[str]) -> dict[str, np.ndarray]:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} generations but {len(refs)} references; they must pair up one to one")
    rows = [rouge(p, r) | {"chrf": chrf(p, r), "exact_match": exact_match(p, r)} for p, r in zip(preds, refs)]
    return {k: np.array([row[k] for row in rows], dtype=np.float64) for k in TEXT_METRICS}


def score(preds: list[str], refs: list[str], bootstrap_samples: int, seed: int) -> dict:
    """Each metric's mean, its CI under `ci_by_metric` (the same resamples for all), and n."""
    per = per_example(preds, refs)
    out: dict = {k: float(v.mean()) if len(v) else float("nan") for k, v in per.items()}
    out["ci_by_metric"] = {k: bootstrap_ci(v, bootstrap_samples, seed) for k, v in per.items()}
    out["n"] = len(preds)
    return out
