"""Words to sub-word windows and back: the model side of token classification.

words --(fast tokenizer, `is_split_into_words`)--> sub-words --> windows of at most `max_length`
--> model logits per sub-word --> one row of logits per word (`stitch`) --> BIO tags (`tags_from_logits`).

Labels. Only the FIRST sub-word of a word carries its label; the word's other sub-words and the
special tokens get -100 (ignored by the loss), and prediction reads each word from its first sub-word
too, so training and inference agree.

Windows. A sentence that fits (`max_length` counts the special tokens the tokenizer adds) is one
window. A longer one is cut into windows of WHOLE words (never mid-word) that overlap by at most
`stride` sub-words (the most whole words that fit in `stride`), so no word is silently dropped, as
truncation would. A word longer than the room in a window (`max_length` minus the special tokens)
keeps only its first sub-words (so it is still labelled and predicted) and is listed in the window's
`truncated_words`.

Ownership. A word in an overlap is seen by two (rarely more) windows; exactly one OWNS it, and the
owner's logits are the word's. The owner is the window in which the word's first sub-word has the
most context on its poorer side: the largest min(sub-words to its left, sub-words to its right) within
the window, where a window edge that is the sentence's own start or end counts as unlimited context
(nothing is cut off there). Ties go to the earlier window. Because window starts and ends both strictly
increase, the owner never moves backwards as the word index grows, so each window owns one contiguous
run of words, `[own_start, own_end)` (possibly empty in a corner case of triple overlap). In practice
this cuts each overlap near its middle, like the usual "centre of the stride" rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = -100  # the label of sub-words the loss must skip (torch's CrossEntropyLoss default ignore_index)


@dataclass(frozen=True)
class LabelSet:
    """The BIO tags of a task, in model label order: "O" first, then B-X, I-X for each type X sorted."""

    tags: tuple[str, ...]

    def __post_init__(self):
        tags = tuple(self.tags)
        object.__setattr__(self, "tags", tags)
        if not tags:
            raise ValueError("a label set needs at least one tag")
        if len(set(tags)) != len(tags):
            raise ValueError(f"duplicate tags in {tags}")

    @classmethod
    def from_types(cls, types) -> "LabelSet":
        kinds = sorted(set(types))
        for kind in kinds:
            if not kind or kind == "O" or kind.startswith(("B-", "I-")):
                raise ValueError(f"{kind!r} is not an entity type (give types such as PER, not tags such as B-PER)")
        return cls(("O",) + tuple(tag for kind in kinds for tag in (f"B-{kind}", f"I-{kind}")))

    @classmethod
    def from_id2label(cls, id2label: dict) -> "LabelSet":
        """The tags in a model config's label order (keys may be ints or digit strings)."""
        by_id = {int(k): v for k, v in id2label.items()}
        return cls(tuple(by_id[i] for i in range(len(by_id))))

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(sorted({t[2:] for t in self.tags if t.startswith(("B-", "I-"))}))

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.tags))

    @property
    def label2id(self) -> dict[str, int]:
        return {tag: i for i, tag in enumerate(self.tags)}

    def __len__(self) -> int:
        return len(self.tags)


@dataclass(frozen=True)
class Window:
    """One model input: a run of whole words of one sentence, with the tokenizer's special tokens.

    `word_index[p]` is the sentence-level word index of sub-word position p (-1 for special tokens);
    `labels[p]` the tag id on a word's first sub-word and -100 elsewhere (None without tags).
    The window covers words `[word_start, word_end)` and owns `[own_start, own_end)` (see the module
    docstring); `truncated_words` lists words whose sub-words were cut to fit."""

    sentence: int
    input_ids: list[int]
    labels: list[int] | None
    word_index: list[int]
    word_start: int
    word_end: int
    own_start: int
    own_end: int
    truncated_words: tuple[int, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.input_ids)

    def first_positions(self) -> dict[int, int]:
        """Sentence word index -> position of that word's first sub-word in this window."""
        out: dict[int, int] = {}
        for pos, w in enumerate(self.word_index):
            if w >= 0 and w not in out:
                out[w] = pos
        return out


def special_layout(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids a tokenizer puts before and after a single sequence (e.g. [CLS] / [SEP])."""
    enc = tokenizer(["a"], is_split_into_words=True, add_special_tokens=True)
    words = enc.word_ids()
    inside = [i for i, w in enumerate(words) if w is not None]
    if not inside:
        raise ValueError("the tokenizer produced no token for the probe word 'a'; cannot find its special tokens")
    ids = enc["input_ids"]
    return list(ids[: inside[0]]), list(ids[inside[-1] + 1:])


def word_pieces(tokenizer, sentences_tokens: list[list[str]]) -> list[list[list[int]]]:
    """For each sentence, each word's sub-word ids (no special tokens). A word the tokenizer maps to
    nothing (an empty string, a control character) gets the unknown token, so every word stays visible."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("token classification needs a fast (Rust `tokenizers`) tokenizer: word_ids() aligns words "
                        "to sub-words; load it with AutoTokenizer(..., use_fast=True) or convert the model's tokenizer")
    out: list[list[list[int]]] = [[[] for _ in words] for words in sentences_tokens]
    todo = [i for i, words in enumerate(sentences_tokens) if words]
    if todo:
        enc = tokenizer([list(sentences_tokens[i]) for i in todo], is_split_into_words=True, add_special_tokens=False,
                        verbose=False)  # long sentences are windowed below: no "longer than max" warning
        for row, i in enumerate(todo):
            for piece, w in zip(enc["input_ids"][row], enc.word_ids(row)):
                if w is not None:
                    out[i][w].append(int(piece))
    unk = tokenizer.unk_token_id
    for i, sentence in enumerate(out):
        for w, pieces in enumerate(sentence):
            if not pieces:
                if unk is None:
                    raise ValueError(f"sentence {i}, word {w} ({sentences_tokens[i][w]!r}) has no sub-words and the "
                                     "tokenizer has no unknown token to stand in for it")
                pieces.append(int(unk))
    return out


def window_spans(counts: list[int], room: int, stride: int) -> list[tuple[int, int]]:
    """Word ranges [start, end) of the windows over words with `counts` sub-words each (each <= room).

    Each window takes as many whole words as fit in `room`; the next one starts at the earliest word
    such that the words it shares with the previous window hold at most `stride` sub-words AND it gains
    at least the next word. Starts and ends therefore strictly increase and every word is covered."""
    n = len(counts)
    if n == 0:
        return []
    prefix = np.concatenate([[0], np.cumsum(counts)])
    spans, start = [], 0
    while True:
        end = int(np.searchsorted(prefix, prefix[start] + room, side="right")) - 1  # most words that fit
        end = max(end, start + 1)
        spans.append((start, end))
        if end >= n:
            return spans
        # earliest s with sum(counts[s:end]) <= stride and sum(counts[s:end + 1]) <= room
        s_overlap = int(np.searchsorted(prefix, prefix[end] - stride, side="left"))
        s_fit = int(np.searchsorted(prefix, prefix[end + 1] - room, side="left"))
        start = max(s_overlap, s_fit, start + 1)


def owners(spans: list[tuple[int, int]], counts: list[int]) -> list[int]:
    """For each word, the index of the window that owns it (the ownership rule of the module docstring)."""
    n = spans[-1][1] if spans else 0
    prefix = np.concatenate([[0], np.cumsum(counts)]) if counts else np.zeros(1)
    big = float("inf")
    owner = [-1] * n
    best = [-1.0] * n
    for k, (s, e) in enumerate(spans):
        for w in range(s, e):
            left = big if s == 0 else float(prefix[w] - prefix[s])
            right = big if e == n else float(prefix[e] - prefix[w] - 1)
            score = min(left, right)
            if score > best[w]:  # strict: ties stay with the earlier window
                best[w], owner[w] = score, k
    return owner


def encode_windows(tokenizer, sentences_tokens: list[list[str]], tags: list[list[str]] | None,
                   label_set: LabelSet, max_length: int, stride: int) -> list[Window]:
    """Windows over all sentences, in sentence order (an empty sentence yields none)."""
    prefix_ids, suffix_ids = special_layout(tokenizer)
    room = max_length - len(prefix_ids) - len(suffix_ids)
    if room < 1:
        raise ValueError(f"max_length {max_length} leaves no room for words after the tokenizer's "
                         f"{len(prefix_ids) + len(suffix_ids)} special tokens")
    if stride < 0 or stride >= room:
        raise ValueError(f"stride must be in [0, {room}) for max_length {max_length} (got {stride})")
    if tags is not None:
        if len(tags) != len(sentences_tokens):
            raise ValueError(f"{len(tags)} tag lists for {len(sentences_tokens)} sentences")
        label2id = label_set.label2id
    pieces = word_pieces(tokenizer, sentences_tokens)
    windows: list[Window] = []
    for i, words in enumerate(pieces):
        if tags is not None:
            if len(tags[i]) != len(words):
                raise ValueError(f"sentence {i}: {len(words)} words but {len(tags[i])} tags")
            unknown = [t for t in tags[i] if t not in label2id]
            if unknown:
                raise ValueError(f"sentence {i}: tag {unknown[0]!r} is not one of {label_set.tags}")
        truncated = {w for w, p in enumerate(words) if len(p) > room}
        words = [p[:room] for p in words]
        counts = [len(p) for p in words]
        spans = window_spans(counts, room, stride)
        owner = owners(spans, counts)
        for k, (s, e) in enumerate(spans):
            owned = [w for w in range(s, e) if owner[w] == k]
            own_start, own_end = (owned[0], owned[-1] + 1) if owned else (s, s)
            assert len(owned) == own_end - own_start, "ownership must be contiguous"
            ids, index, labels = list(prefix_ids), [-1] * len(prefix_ids), [IGNORE_INDEX] * len(prefix_ids)
            for w in range(s, e):
                ids.extend(words[w])
                index.extend([w] * len(words[w]))
                if tags is not None:
                    labels.append(label2id[tags[i][w]])
                    labels.extend([IGNORE_INDEX] * (len(words[w]) - 1))
            ids.extend(suffix_ids)
            index.extend([-1] * len(suffix_ids))
            labels.extend([IGNORE_INDEX] * len(suffix_ids))
            windows.append(Window(i, ids, labels if tags is not None else None, index, s, e, own_start, own_end,
                                  tuple(sorted(w for w in truncated if s <= w < e))))
    return windows


def stitch(windows: list[Window], window_logits: list[np.ndarray], n_words_per_sentence: list[int]) -> list[np.ndarray]:
    """Per sentence, a (words, labels) array: each word's logits at its first sub-word in the window owning it.

    `window_logits[k]` holds window k's logits per position (rows past its length, padding, are ignored)."""
    if len(windows) != len(window_logits):
        raise ValueError(f"{len(window_logits)} logits arrays for {len(windows)} windows")
    n_labels = next((np.asarray(x).shape[-1] for x in window_logits), 0)
    out = [np.zeros((n, n_labels), dtype=np.float32) for n in n_words_per_sentence]
    filled = [np.zeros(n, dtype=np.int64) for n in n_words_per_sentence]
    for window, logits in zip(windows, window_logits):
        logits = np.asarray(logits)
        first = window.first_positions()
        for w in range(window.own_start, window.own_end):
            out[window.sentence][w] = logits[first[w]]
            filled[window.sentence][w] += 1
    for i, count in enumerate(filled):
        if not np.all(count == 1):
            w = int(np.flatnonzero(count != 1)[0])
            raise ValueError(f"sentence {i}, word {w} is owned by {int(count[w])} windows (must be exactly 1)")
    return out


def repair_bio(tags: list[str]) -> list[str]:
    """Valid BIO: an I-X that does not continue a B-X / I-X (after O, after another type, first) becomes B-X."""
    out, prev = [], "O"
    for tag in tags:
        if tag.startswith("I-") and not (prev.startswith(("B-", "I-")) and prev[2:] == tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return out


def tags_from_logits(logits_per_sentence: list[np.ndarray],
                     label_set: LabelSet) -> tuple[list[list[str]], list[np.ndarray]]:
    """Per sentence, each word's tag (argmax, then `repair_bio`) and the softmax probability of the argmax
    label (the model's own confidence, before any repair, as transformers' pipeline reports it)."""
    tags, scores = [], []
    for logits in logits_per_sentence:
        logits = np.asarray(logits, dtype=np.float64).reshape(-1, len(label_set))
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        tags.append(repair_bio([label_set.tags[j] for j in best]))
        scores.append(probs[np.arange(len(best)), best])
    return tags, scores
