"""Exact-after-normalisation and near-duplicate groups of texts, fast enough for 100k rows on 2 cores.

Normalisation folds case, punctuation and whitespace. Near duplicates: MinHash signatures over word
1-2-gram shingles (hashed by scikit-learn's HashingVectorizer, so the hashing runs in C), banded LSH
for candidates, then the exact Jaccard similarity of each candidate pair against the threshold.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numpy as np
from sklearn.feature_extraction.text import HashingVectorizer

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")
_PRIME = np.uint64((1 << 61) - 1)
_N_FEATURES = 1 << 18
_PERMS, _BANDS = 64, 16  # 16 bands x 4 rows: a pair at Jaccard 0.7 is a candidate with p > 0.99


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def exact_groups(normalised: list[str]) -> list[list[int]]:
    """Groups (of 2 or more indices) whose normalised texts are equal."""
    by_key: dict[str, list[int]] = {}
    for i, key in enumerate(normalised):
        by_key.setdefault(key, []).append(i)
    return [ids for ids in by_key.values() if len(ids) > 1]


def _signatures(x, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 61, _PERMS, dtype=np.uint64)
    b = rng.integers(0, 1 << 61, _PERMS, dtype=np.uint64)
    cols = np.arange(_N_FEATURES, dtype=np.uint64)
    # one random permutation value per (feature, perm); 64 MB of uint32
    table = (((cols[:, None] * a[None, :]) + b[None, :]) % _PRIME % np.uint64(1 << 32)).astype(np.uint32)
    sig = np.full((x.shape[0], _PERMS), np.iinfo(np.uint32).max, dtype=np.uint32)
    nonempty = np.diff(x.indptr) > 0
    chunk = 8192
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk]
        rows = np.flatnonzero(np.diff(part.indptr) > 0)
        if len(rows) == 0:
            continue
        values = table[part.indices]
        sig[start + rows] = np.minimum.reduceat(values, part.indptr[:-1][rows], axis=0)
    sig[~nonempty] = np.arange(_PERMS, dtype=np.uint32)  # empty docs match nothing
    return sig


def _candidates(sig: np.ndarray, max_bucket: int = 50) -> set[tuple[int, int]]:
    rows = _PERMS // _BANDS
    pairs: set[tuple[int, int]] = set()
    mult = np.array([1, 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D], dtype=np.uint64)[:rows]
    for band in range(_BANDS):
        keys = (sig[:, band * rows : (band + 1) * rows].astype(np.uint64) * mult).sum(axis=1)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts, ends):
            if 1 < e - s <= max_bucket:
                members = sorted(order[s:e].tolist())
                pairs.update((members[i], members[j]) for i in range(len(members)) for j in range(i + 1, len(members)))
    return pairs


def near_pairs(normalised: list[str], threshold: float, seed: int = 0) -> list[tuple[int, int, float]]:
    """Pairs (i, j, jaccard) with i < j, distinct normalised texts and Jaccard >= threshold."""
    if len(normalised) < 2:
        return []
    vec = HashingVectorizer(n_features=_N_FEATURES, ngram_range=(1, 2), binary=True, norm=None,
                            alternate_sign=False, token_pattern=r"(?u)\b\w+\b")
    x = vec.transform(normalised).tocsr()
    x.sort_indices()
    cand = _candidates(_signatures(x, seed))
    if not cand:
        return []
    i, j = np.array(sorted(cand)).T
    inter = np.asarray(x[i].multiply(x[j]).sum(axis=1)).ravel()
    size = np.diff(x.indptr)
    jac = inter / np.maximum(size[i] + size[j] - inter, 1)
    keep = (jac >= threshold) & (np.array([normalised[a] != normalised[b] for a, b in zip(i, j)]))
    return [(int(a), int(b), float(s)) for a, b, s in zip(i[keep], j[keep], jac[keep])]


@dataclass
class DuplicateGraph:
    """Exact (after normalisation) and near-duplicate links between rows, computed once per run and shared
    by the split (which keeps each connected group in one split) and the audit (which reports the links).
    Node i is the row `keys[i]` = (file, data row). A task whose inputs are not text builds its own (images: the same
    pixels, and a perceptual-hash similarity); `exact_means` / `similarity` say what its links mean in messages."""

    keys: list[tuple[str, int]]
    exact: list[list[int]]
    near: list[tuple[int, int, float]]
    threshold: float
    exact_means: str = "the same text (after normalising case, punctuation and spaces)"
    similarity: str = "Jaccard"

    def node_of(self) -> dict[tuple[str, int], int]:
        return {key: i for i, key in enumerate(self.keys)}

    def components(self, nodes: list[int]) -> np.ndarray:
        """A group id for each of `nodes`: rows linked (directly or through others among `nodes`) share one."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        local = {node: k for k, node in enumerate(nodes)}
        edges = [(a, b) for a, b, _ in self.near] + [(g[0], other) for g in self.exact for other in g[1:]]
        edges = [(local[a], local[b]) for a, b in edges if a in local and b in local]
        n = len(nodes)
        rows = np.array([a for a, _ in edges], dtype=np.int64)
        cols = np.array([b for _, b in edges], dtype=np.int64)
        graph = coo_matrix((np.ones(len(edges)), (rows, cols)), shape=(n, n))
        return connected_components(graph, directed=False)[1]


def duplicate_graph(texts: list[str], keys: list[tuple[str, int]], threshold: float, seed: int = 0) -> DuplicateGraph:
    normalised = [normalise(t) for t in texts]
    return DuplicateGraph(keys=list(keys), exact=exact_groups(normalised),
                          near=near_pairs(normalised, threshold, seed=seed), threshold=threshold)
