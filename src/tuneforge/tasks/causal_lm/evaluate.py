"""Test metrics of the exported model beside the baselines: loss and perplexity (with a bootstrap CI over
examples), and for pairs and chats the greedy generations scored by exact match, ROUGE-L and chrF (and
accuracy / macro-F1 when the completions form a closed set), each with a bootstrap 95% CI."""
from __future__ import annotations

import numpy as np


def perplexity_ci(nll: np.ndarray, tokens: np.ndarray, samples: int, seed: int) -> dict | None:
    """95% bootstrap CI of the perplexity (total NLL over total tokens), resampling whole examples."""
    if samples == 0 or len(nll) < 2:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(nll), size=(samples, len(nll)))
    ppl = np.exp(np.minimum(nll[idx].sum(1) / np.maximum(tokens[idx].sum(1), 1), 50.0))
    return {"low": float(np.percentile(ppl, 2.5)), "high": float(np.percentile(ppl, 97.5))}


def _scored(cfg, space, refs: list[str], generations: list[str] | None, nll=None, tokens=None) -> dict:
    from tuneforge.tasks.causal_lm.generate import perplexity
    from tuneforge.tasks.causal_lm.metrics import score_generations

    m: dict = {}
    if nll is not None:
        nll, tokens = np.asarray(nll, dtype=float), np.asarray(tokens)
        loss = float(nll.sum() / max(int(tokens.sum()), 1))
        m.update(loss=loss, perplexity=perplexity(loss))
        m["ci_by_metric"] = {"perplexity": perplexity_ci(nll, tokens, cfg.eval.bootstrap_samples, cfg.train.seed)}
    if generations is not None:
        s = score_generations(generations, refs, space.classes, cfg.eval.bootstrap_samples, cfg.train.seed)
        m.update({k: v for k, v in s.items() if k != "ci"})
        m.setdefault("ci_by_metric", {}).update(s["ci"])
    return m


def main_metric(cfg, space) -> str:
    return cfg.eval.metric or ("perplexity" if space.kind == "text" else "rouge_l")


def evaluate(cfg, space, splits, y: dict, predictor, baselines: dict) -> tuple[dict, list[str]]:
    from tuneforge.tasks.causal_lm.generate import example_losses

    key = main_metric(cfg, space)
    if space.kind == "text" and key != "perplexity":
        from tuneforge.errors import ConfigError

        raise ConfigError(f"eval.metric {key} needs completions to compare with, and plain text has none",
                          fix="leave eval.metric null (perplexity) for text data")
    test = splits.test
    refs = list(test.labels)
    nll, tokens = example_losses(predictor.model, y["test"], predictor.pad_id, cfg.eval.batch_size, predictor.precision)
    generations = details = None
    if space.kind != "text":
        prompts = [predictor.prompt_of(m[:-1]) for m in test.extras["messages"]]
        details = predictor.complete_details(prompts, space.max_new_tokens, cfg.eval.batch_size)
        generations = [d["completion"] for d in details]
    model = _scored(cfg, space, refs, generations, nll, tokens)
    scored = {}
    for name, b in baselines.items():
        scored[name] = _scored(cfg, space, refs, b.get("generations"), b.get("nll"), b.get("tokens"))
    for m in [model, *scored.values()]:
        m["ci"] = (m.get("ci_by_metric") or {}).get(key)
    result = {"main_metric": key, "kind": space.kind, "labels": space.classes or [],
              "test": {"model": model, "baselines": {n: s for n, s in scored.items() if s.get(key) is not None}},
              "max_new_tokens": space.max_new_tokens, "chat_template": space.template}
    skipped = sorted(set(scored) - set(result["test"]["baselines"]))
    if skipped:
        result["baselines_without_" + key] = {n: scored[n] for n in skipped}
    result["samples"] = _samples(cfg, test, generations, baselines)
    return result, details  # each generation and how it ended, for the drift reference (None for plain text)


def _samples(cfg, test, generations, baselines: dict) -> list[dict]:
    """Side-by-side test generations for the report: prompt, reference, the untuned model's, the tuned model's."""
    if generations is None:
        return []
    first_of_prompt: dict[str, int] = {}  # one sample per distinct prompt (the split keeps repeated prompts together)
    for k, p in enumerate(test.texts):
        first_of_prompt.setdefault(p, k)
    base = (baselines.get("base_zero_shot") or {}).get("generations")
    return [{"prompt": test.texts[k], "reference": test.labels[k], "base_zero_shot": base[k] if base else None,
             "model": generations[k]} for k in list(first_of_prompt.values())[: cfg.task.samples_in_report]]
