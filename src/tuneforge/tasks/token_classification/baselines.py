"""Cheap token-classification baselines every fine-tuned model must beat, scored on the same test sentences.

Each takes `Sentence`s (anything with `.tokens` and, for training, `.tags`), fits on the training sentences
only and returns one predicted BIO tag list per test sentence.

- majority: every token "O" (the most frequent tag in any NER data); its entity F1 is 0 by construction,
  so it is the floor, not a competitor.
- gazetteer: the entity strings seen in training, looked up in the test sentences. A training entity's
  token sequence is stored with its most frequent type (ties: alphabetically first). Matching is on whole
  tokens, longest entry first, left to right, never overlapping. Case: an exact (case-sensitive) match is
  tried first; a case-insensitive match is a fallback only for spans with at least one upper-case letter,
  so "NEW YORK" or "New york" find "New York", while an all-lower-case span ("may", "apple") never matches
  a capitalised name ("May", "Apple"): common words would otherwise flood the output with false entities.
  At one position the longest match wins, exact before case-insensitive at equal length.
- crf: a linear-chain conditional random field (sklearn-crfsuite, L-BFGS, L1 + L2 regularisation) on
  hand-made word features of the word and its neighbours. **This is the strong classical baseline**: it
  learns the context (titles, prepositions, capitalisation, suffixes) and the tag transitions, and so
  generalises to names never seen in training, which the gazetteer cannot. A fine-tuned model that does
  not clearly beat it has gained little from pre-training. Fits in seconds on a few thousand sentences.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict

from tuneforge.tasks.token_classification.sentence import entities


def majority(test) -> list[list[str]]:
    """Every token "O"."""
    return [["O"] * len(s.tokens) for s in test]


# --------------------------------------------------------------------------------------------- gazetteer

def _lower_key(tokens) -> tuple[str, ...]:
    return tuple(t.lower() for t in tokens)


def _build_gazetteer(train) -> tuple[dict, dict, int]:
    """{token tuple: type} exact and lower-cased, each with the most frequent type; and the longest entry."""
    exact: dict[tuple, Counter] = defaultdict(Counter)
    lower: dict[tuple, Counter] = defaultdict(Counter)
    longest = 0
    for s in train:
        for kind, start, end in entities(s.tags):
            toks = tuple(s.tokens[start:end])
            exact[toks][kind] += 1
            lower[_lower_key(toks)][kind] += 1
            longest = max(longest, end - start)

    def best(table):  # most frequent type; ties alphabetically first, so the result does not depend on order
        return {key: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for key, c in table.items()}

    return best(exact), best(lower), longest


def gazetteer(train, test) -> list[list[str]]:
    """Tag test spans equal to entities seen in training (see the module docstring for the matching rules)."""
    exact, lower, longest = _build_gazetteer(train)
    out = []
    for s in test:
        toks = list(s.tokens)
        n = len(toks)
        tags = ["O"] * n
        i = 0
        while i < n:
            kind, length = None, 0
            for ln in range(min(longest, n - i), 0, -1):
                span = tuple(toks[i:i + ln])
                kind = exact.get(span)
                if kind is None and any(ch.isupper() for t in span for ch in t):
                    kind = lower.get(_lower_key(span))
                if kind is not None:
                    length = ln
                    break
            if kind is None:
                i += 1
                continue
            tags[i] = f"B-{kind}"
            for j in range(i + 1, i + length):
                tags[j] = f"I-{kind}"
            i += length
        out.append(tags)
    return out


# --------------------------------------------------------------------------------------------------- CRF

def _shape(word: str) -> str:
    """Upper-case letters X, other letters x, digits d, anything else kept; runs collapsed, at most 8
    characters: "London" Xx, "1984" d, "U.S." X.X., "e-mail" x-x, "McDonald" XxXx."""
    w = "".join("X" if ch.isupper() else "x" if ch.isalpha() else "d" if ch.isdigit() else ch for ch in word)
    return re.sub(r"(.)\1+", r"\1", w)[:8]


def _length_bucket(n: int) -> str:
    return "1" if n <= 1 else "2-3" if n <= 3 else "4-6" if n <= 6 else "7-10" if n <= 10 else "11+"


def _word_features(word: str, prefix: str, feats: dict) -> None:
    low = word.lower()
    feats[prefix + "lower"] = low
    feats[prefix + "suf3"] = low[-3:]
    feats[prefix + "suf2"] = low[-2:]
    feats[prefix + "pre2"] = low[:2]
    feats[prefix + "pre3"] = low[:3]
    feats[prefix + "shape"] = _shape(word)
    feats[prefix + "title"] = word.istitle()
    feats[prefix + "upper"] = word.isupper()
    feats[prefix + "digit"] = word.isdigit()
    feats[prefix + "hyphen"] = "-" in word
    feats[prefix + "len"] = _length_bucket(len(word))


def _sentence_features(tokens: list[str]) -> list[dict]:
    out = []
    n = len(tokens)
    for i, word in enumerate(tokens):
        feats = {"bias": 1.0}
        _word_features(word, "", feats)
        if i > 0:
            _word_features(tokens[i - 1], "-1:", feats)
        else:
            feats["BOS"] = True
        if i < n - 1:
            _word_features(tokens[i + 1], "+1:", feats)
        else:
            feats["EOS"] = True
        out.append(feats)
    return out


def crf(train, test, seed: int = 0, c1: float = 0.1, c2: float = 0.1, max_iterations: int = 100) -> list[list[str]]:
    """A linear-chain CRF on word features of positions -1, 0, +1 (see `_word_features`), plus BOS/EOS.

    Training by L-BFGS is deterministic; `seed` is accepted for a uniform baseline interface and does not
    change the result. With no entity in training it predicts all "O" (majority)."""
    import sklearn_crfsuite

    del seed  # crfsuite's L-BFGS has no randomness
    train = [s for s in train if len(s.tokens)]
    if not any(t != "O" for s in train for t in s.tags):
        return majority(test)
    model = sklearn_crfsuite.CRF(algorithm="lbfgs", c1=c1, c2=c2, max_iterations=max_iterations,
                                 all_possible_transitions=True)
    model.fit([_sentence_features(list(s.tokens)) for s in train], [list(s.tags) for s in train])
    out = []
    for s in test:
        toks = list(s.tokens)
        out.append(list(model.predict_single(_sentence_features(toks))) if toks else [])
    return out
