"""Test metrics of the exported model beside the baselines: ROUGE-1/2/L/Lsum, chrF and exact match of its generations
(greedy or beam, as exported), each with a bootstrap 95% CI, and the loss and perplexity of the test targets."""
from __future__ import annotations

import numpy as np

from tuneforge.tasks.seq2seq.spec import TEXT_METRICS


def scored(cfg, refs: list[str], generations: list[str] | None, nll=None, tokens=None) -> dict:
    from tuneforge.tasks.causal_lm.evaluate import perplexity_ci
    from tuneforge.tasks.seq2seq.generate import perplexity
    from tuneforge.tasks.seq2seq.metrics import score

    m: dict = {"ci_by_metric": {}}
    if generations is not None:
        s = score(generations, refs, cfg.eval.bootstrap_samples, cfg.train.seed)
        m.update({k: s[k] for k in (*TEXT_METRICS, "n")})
        m["ci_by_metric"].update(s["ci_by_metric"])
    if nll is not None:
        nll, tokens = np.asarray(nll, dtype=float), np.asarray(tokens)
        loss = float(nll.sum() / max(int(tokens.sum()), 1))
        m.update(loss=loss, perplexity=perplexity(loss))
        m["ci_by_metric"]["perplexity"] = perplexity_ci(nll, tokens, cfg.eval.bootstrap_samples, cfg.train.seed)
    return m


def evaluate(cfg, space, splits, y: dict, predictor, baselines: dict) -> tuple[dict, list[dict]]:
    from tuneforge.tasks.seq2seq.generate import example_losses

    key = cfg.eval.metric
    test = splits.test
    refs = list(test.labels)
    nll, tokens = example_losses(predictor.model, predictor.sources(list(test.texts)), list(y["test"]), predictor.pad_id,
                                 cfg.eval.batch_size, predictor.precision)
    details = predictor.generate(list(test.texts), space.max_new_tokens, cfg.eval.batch_size)
    generations = [d["generation"] for d in details]
    model = scored(cfg, refs, generations, nll, tokens)
    by_name = {name: scored(cfg, refs, b.get("generations"), b.get("nll"), b.get("tokens")) for name, b in baselines.items()}
    for m in [model, *by_name.values()]:
        m["ci"] = m["ci_by_metric"].get(key)
    result = {"main_metric": key, "labels": [],
              "test": {"model": model, "baselines": by_name},
              "max_new_tokens": space.max_new_tokens, "num_beams": space.num_beams,
              "max_target_length": space.max_target_length, "prefix": space.prefix,
              "truncated_generations": sum(d["finish_reason"] == "length" for d in details)}
    result["samples"] = samples(cfg, test, generations, baselines)
    return result, details


def samples(cfg, test, generations: list[str], baselines: dict) -> list[dict]:
    """Side-by-side test rows for the report: source, reference, the untuned model's and the tuned model's output."""
    untuned = (baselines.get("untuned") or {}).get("generations")
    n = min(cfg.task.samples_in_report, len(test))
    return [{"source": test.texts[k], "reference": test.labels[k], "untuned": untuned[k] if untuned else None,
             "model": generations[k]} for k in range(n)]
