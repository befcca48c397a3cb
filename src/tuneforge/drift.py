"""Drift profiles: binned distributions of what a model sees and says (input size: the `length` signal, characters
of a text unless the task bins its own measure with its own edges; the task's own input measures, such as an image's
brightness; predicted label, confidence), and the population stability index (PSI) between two of them. Written at training time as
the reference (the test split as the model saw it), compared by the server's monitor with live traffic.
Neither torch nor the server is imported here.
"""
from __future__ import annotations

import math

import numpy as np

LENGTH_EDGES = [0, 20, 40, 60, 80, 100, 150, 200, 300, 500, 1000, 10**9]  # characters
CONFIDENCE_EDGES = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0 + 1e-9]
PROFILE_FILE = "reference_profile.json"
COUNT_EDGES = [0, 1, 2, 3, 4, 6, 10, 10**9]  # labels per prediction: entities per text, labels of a multi-label row
DEFAULT_THRESHOLDS = {"length": 0.25, "label": 0.25, "confidence": 0.25, "count": 0.25}  # PSI > 0.25: a significant shift
SIGNALS = ("length", "label", "confidence", "count")


def _shares(counts) -> list[float]:
    total = float(sum(counts)) or 1.0
    return [c / total for c in counts]


def profile(lengths: list[int], labels: list[str], confidences: list[float], label_names: list[str],
            length_edges: list[int] | None = None, measures: dict[str, tuple[list, list[float]]] | None = None) -> dict:
    """Binned distributions of the watched signals: input size (`lengths`, binned by `length_edges`: by default
    characters of a text), the predicted labels (entity types), the confidence, and how many labels a prediction
    carries (entities per text); and under "inputs", each of the task's own input measures (name -> (edges, the
    values; None where an input lacks it)), e.g. an image's brightness."""
    counts = [len(lab.split(",")) if lab else 0 for lab in labels]
    length_edges = length_edges or LENGTH_EDGES
    found = {}
    for name, (edges, values) in (measures or {}).items():
        known = [v for v in values if v is not None]
        if known:
            found[name] = {"edges": list(edges), "shares": _shares(np.histogram(known, list(edges))[0])}
    return {**({"inputs": found} if found else {}),
        "n": len(lengths),
        "count": {"edges": COUNT_EDGES, "shares": _shares(np.histogram(counts, COUNT_EDGES)[0])},
        "length": {"edges": length_edges, "shares": _shares(np.histogram(lengths, length_edges)[0])},
        "confidence": {"edges": CONFIDENCE_EDGES, "shares": _shares(np.histogram(confidences, CONFIDENCE_EDGES)[0])},
        "label": {"names": label_names, "shares": _shares(_label_counts(labels, label_names))},
    }


NO_LABEL = "(none)"  # a multi-label prediction with no label above its threshold


def decision(result: dict) -> tuple[list[str], float]:
    """The labels a prediction chose and its confidence: the probability of the predicted label
    (multi-label: the least certain chosen label, or 1 - the highest if none was chosen). The server's
    log and the training-time reference profile both use this, so drift compares like with like."""
    label, probs = result["label"], result["probabilities"]
    if isinstance(label, list):
        return label, min((probs[lab] for lab in label), default=1 - max(probs.values(), default=0.0))
    return [label], probs[label]


def logged_label(labels: list[str]) -> str:
    """How the request log stores a prediction's labels (multi-label: joined by commas; none: empty)."""
    return ",".join(labels)


def profile_of(sizes: list[int], results: list[dict], label_names: list[str], length_edges: list[int] | None = None,
               measures: dict[str, tuple[list, list[float]]] | None = None) -> dict:
    """The reference profile of predictions `results` on inputs of `sizes` (characters of a text, by default) and
    the task's own input `measures` (name -> (edges, values))."""
    decisions = [decision(r) for r in results]
    return profile(sizes, [logged_label(labs) for labs, _ in decisions], [conf for _, conf in decisions], label_names,
                   length_edges, measures)


def _label_counts(labels: list[str], names: list[str]) -> list[int]:
    """How often each name was predicted. A multi-label prediction is its labels joined by commas (an
    empty string: none); each of its labels counts once, so the shares follow each label's rate."""
    index = {n: i for i, n in enumerate(names)}
    counts = [0] * len(names)
    for lab in labels:
        parts = [lab] if lab in index else (lab.split(",") if lab else [NO_LABEL])
        for part in parts:
            if part in index:
                counts[index[part]] += 1
    return counts


def psi(expected: list[float], actual: list[float], eps: float = 1e-4) -> float:
    """Population stability index: sum (a - e) * ln(a / e); < 0.1 stable, 0.1-0.25 moderate, > 0.25 shift."""
    return float(sum((a - e) * math.log((a + eps) / (e + eps)) for e, a in zip(expected, actual)))


