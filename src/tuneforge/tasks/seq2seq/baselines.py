"""The cheap baselines a fine-tuned encoder-decoder must beat, on the same test sources: `lead` (the source's first
sentences, cut to the length of a typical training target: what a summary that copies the opening scores),
`retrieval` (the target of the most similar training source, TF-IDF) and `untuned` (the pre-trained model before
fine-tuning, decoding as the tuned one does; also its loss on the test targets)."""
from __future__ import annotations

import numpy as np

from tuneforge.tasks.seq2seq.metrics import sentence_lines


def typical_words(targets: list[str]) -> int:
    """The median word count of the training targets (at least 1)."""
    return max(1, int(np.median([len(t.split()) for t in targets]))) if targets else 1


def lead(source: str, words: int) -> str:
    """The source's first sentences, whole while they fit in `words` words, the last one cut to make up the rest."""
    out: list[str] = []
    for sentence in sentence_lines(source).splitlines():
        left = words - sum(len(s.split()) for s in out)
        if left <= 0:
            break
        tokens = sentence.split()
        out.append(" ".join(tokens[:left]))
    return " ".join(out)


def baselines(cfg, space, splits, ids: dict, y: dict, predictor) -> dict:
    from tuneforge.tasks.causal_lm.metrics import retrieval_baseline
    from tuneforge.tasks.seq2seq.generate import example_losses

    wanted, out = cfg.eval.baselines, {}
    train, test = splits.train, splits.test
    if "lead" in wanted:
        words = typical_words(list(train.labels))
        out["lead"] = {"generations": [lead(s, words) for s in test.texts]}
    if "retrieval" in wanted:
        out["retrieval"] = {"generations": retrieval_baseline(list(train.texts), list(train.labels), list(test.texts))}
    if "untuned" in wanted:
        # fp32, as the fine-tuned export is scored: a loss gap must not come from the arithmetic
        nll, count = example_losses(predictor.model, ids["test"], list(y["test"]), predictor.pad_id, cfg.eval.batch_size,
                                    "fp32")
        details = predictor.generate_from(ids["test"], space.max_new_tokens, cfg.eval.batch_size)
        out["untuned"] = {"generations": [d["generation"] for d in details], "nll": nll.tolist(), "tokens": count.tolist()}
    return out
