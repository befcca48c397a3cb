"""The unit of token-classification data: a sentence of words with one BIO (IOB2) tag per word."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sentence:
    """`tokens` are words (not sub-words); `tags` one BIO tag each ("O", "B-TYPE", "I-TYPE").

    `text` is the sentence as a user would send it for prediction; `offsets` the (start, end) character
    span of each token in it. Sentences read from token lists get `text = " ".join(tokens)`.
    `source` and `row` locate it for messages: the file, and its 0-based sentence (JSONL/CSV: data row;
    CoNLL: sentence index) with `line` the 1-based line of its first token where the file has lines."""

    tokens: list[str]
    tags: list[str]
    source: str = ""
    row: int = 0
    line: int | None = None
    text: str = ""
    offsets: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        if not self.text:
            self.text, self.offsets = join_tokens(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)


def join_tokens(tokens: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The tokens joined by single spaces, and each token's character span in that text."""
    offsets, pos = [], 0
    for tok in tokens:
        offsets.append((pos, pos + len(tok)))
        pos += len(tok) + 1
    return " ".join(tokens), offsets


def entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first token, last token + 1) of each entity in a BIO sequence (strict: an entity starts at B-)."""
    out, start, kind = [], None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        if start is not None and not (tag.startswith("I-") and tag[2:] == kind):
            out.append((kind, start, i))
            start, kind = None, None
        if tag.startswith("B-"):
            start, kind = i, tag[2:]
    return out


def cut_sentence(s: Sentence, limit: int) -> Sentence:
    """`s`, or, when its text is longer than `limit` characters, its words that end within the first `limit`
    (a first word longer than that, cut to `limit`): a 10 MB sentence must not stall tokenising."""
    if len(s.text) <= limit:
        return s
    keep = sum(1 for _, end in s.offsets if end <= limit)
    if keep == 0:
        token = s.tokens[0][:limit]
        return Sentence([token], s.tags[:1], source=s.source, row=s.row, line=s.line, text=token, offsets=[(0, len(token))])
    return Sentence(s.tokens[:keep], s.tags[:keep], source=s.source, row=s.row, line=s.line,
                    text=s.text[:s.offsets[keep - 1][1]], offsets=s.offsets[:keep])
