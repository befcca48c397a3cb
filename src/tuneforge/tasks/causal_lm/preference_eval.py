"""Preference pairs' audit, baselines and test evaluation.

Audit: pairs whose answers are (nearly) the same, length bias (the chosen answer the longer one in most pairs), the
rendered template of a pair with its trained tokens marked, truncation. Baselines on the test pairs: the reference
model's own ranking (log p(chosen) > log p(rejected)), the longer answer, and SFT on the chosen answers alone (a run
of the SFT path on the same pairs, trained by the pipeline). Test: preference accuracy (the tuned model's implicit
reward ranks chosen above rejected) and mean reward margin with bootstrap CIs, the chosen answers' loss and
perplexity, and side-by-side generations of the base and tuned model.
"""
from __future__ import annotations

from difflib import SequenceMatcher

import numpy as np

NEAR_SAME = 0.9        # answers this similar (difflib ratio) teach almost nothing
LENGTH_BIAS = 0.65     # the share of pairs whose chosen answer is longer above which length alone scores well
SFT_BASELINE = "sft_chosen"


def answer_tokens(pairs) -> np.ndarray:
    """Tokens of each pair's chosen and rejected answer (pairs x 2), as trained (end of turn included)."""
    return np.array([[len(p.chosen.ids) - p.chosen.prompt_len, len(p.rejected.ids) - p.rejected.prompt_len]
                     for p in pairs], dtype=float).reshape(-1, 2)


def audit_sections(data, pairs: dict, tokenizer, max_length: int, template: bool) -> dict:
    """`pairs`: split -> its encoded pairs (render_pairs)."""
    from tuneforge.tasks.causal_lm.audit import marked

    train = data.splits.train
    out = {}
    if pairs["train"]:
        p, row = pairs["train"][0], train.rows[0]
        shown = (f"row {row}, chosen:\n{marked(tokenizer, p.chosen.ids, p.chosen.labels)}\n\nrow {row}, rejected:\n"
                 f"{marked(tokenizer, p.rejected.ids, p.rejected.labels)}")
        out["template"] = {"severity": "info", "chat_template": template, "display": shown,
                           "examples": [{"row": row, "chosen": marked(tokenizer, p.chosen.ids, p.chosen.labels),
                                         "rejected": marked(tokenizer, p.rejected.ids, p.rejected.labels)}],
                           "summary": (f"{'chat template' if template else 'no chat template (plain join)'}; the first "
                                       "training pair rendered in audit.json, trained tokens in [[ ]]")}
    near = []
    for name, ex in data.splits.items():
        for k, (good, bad) in enumerate(zip(ex.labels, ex.extras["rejected"])):
            ratio = SequenceMatcher(None, good, bad, autojunk=False).ratio() if max(len(good), len(bad)) < 5000 else 0.0
            if ratio >= NEAR_SAME:
                near.append({"split": name, "file": ex.source, "row": ex.rows[k], "similarity": round(ratio, 3)})
    n_pairs = sum(len(ex) for _, ex in data.splits.items())
    out["near_identical_pairs"] = {
        "severity": "warning" if near and len(near) / max(n_pairs, 1) > 0.02 else "info", "rows": near[:200],
        "count": len(near),
        "summary": (f"{len(near)} pairs whose answers are {NEAR_SAME:.0%}+ alike (little to learn from them)" if near
                    else "none: every pair's answers differ")}
    lengths = answer_tokens(pairs["train"])
    longer = float(np.mean(lengths[:, 0] > lengths[:, 1])) if len(lengths) else 0.0
    biased = longer > LENGTH_BIAS or (len(lengths) and float(np.mean(lengths[:, 0] < lengths[:, 1])) > LENGTH_BIAS)
    out["length_bias"] = {
        "severity": "warning" if biased else "info", "chosen_longer": round(longer, 4),
        "mean_tokens": {"chosen": float(lengths[:, 0].mean()) if len(lengths) else 0.0,
                        "rejected": float(lengths[:, 1].mean()) if len(lengths) else 0.0},
        "summary": (f"the chosen answer is the longer one in {longer:.0%} of training pairs"
                    + (": length alone would rank most pairs right, and DPO may learn to write longer (the length "
                       "baseline shows it; task.preference_loss: sigmoid_norm trains on per-token ratios)" if biased else ""))}
    splits, over_rows = {}, 0
    for name, ps in pairs.items():
        over = sum(max(len(p.chosen.ids), len(p.rejected.ids)) > max_length for p in ps)
        over_rows += over
        splits[name] = {"rows": len(ps), "truncated": over}
    out["truncation"] = {"severity": "warning" if over_rows > 0.05 * max(n_pairs, 1) else "info", "max_length": max_length,
                         "splits": splits,
                         "summary": "; ".join(f"{k} {v['truncated']} of {v['rows']} pairs with an answer cut at {max_length} tokens"
                                              for k, v in splits.items())}
    return out


def baselines(cfg, space, splits, y: dict, predictor) -> dict:
    """The reference model's log-probs of the test pairs (always: the tuned model's rewards are measured from them),
    its generations for the report's sample prompts, and the length baseline."""
    from tuneforge.tasks.causal_lm.preference import pair_logps

    test = y["test"]
    logp, count = pair_logps(predictor.model, list(test), predictor.pad_id, cfg.eval.batch_size, "fp32")
    prompts = sample_prompts(cfg, splits.test)
    details = predictor.complete_details([predictor.prompt_of(m) for m in prompts.values()], space.max_new_tokens,
                                         cfg.eval.batch_size) if prompts else []
    out = {"reference": {"logps": logp.tolist(), "tokens": count.tolist(),
                         "samples": {p: d["completion"] for p, d in zip(prompts, details)}}}
    if "length" in cfg.eval.baselines:
        out["length"] = {"lengths": answer_tokens(test).tolist()}
    return out


def score_sft(cfg, y: dict, model, pad_id: int) -> dict:
    """The SFT baseline's log-probs of the test pairs (fp32, as the tuned export is scored)."""
    from tuneforge.tasks.causal_lm.preference import pair_logps

    logp, count = pair_logps(model, list(y["test"]), pad_id, cfg.eval.batch_size, "fp32")
    return {"logps": logp.tolist(), "tokens": count.tolist()}


def sample_prompts(cfg, test) -> dict[str, list[dict]]:
    """The first `task.samples_in_report` distinct test prompts: text -> the prompt's turns."""
    out: dict[str, list[dict]] = {}
    for text, messages in zip(test.texts, test.extras["messages"]):
        if len(out) >= cfg.task.samples_in_report:
            break
        out.setdefault(text, messages[:-1])
    return out


def _scored(cfg, logp, count, reference, ranked_by_reward: bool) -> dict:
    from tuneforge.tasks.causal_lm.evaluate import perplexity_ci
    from tuneforge.tasks.causal_lm.generate import perplexity
    from tuneforge.tasks.causal_lm.metrics import bootstrap_ci
    from tuneforge.tasks.causal_lm.preference import preference_scores

    t, samples, seed = cfg.task, cfg.eval.bootstrap_samples, cfg.train.seed
    s = preference_scores(logp, count, reference if ranked_by_reward else None, t.beta, t.preference_loss)
    m = {"preference_accuracy": float(s["correct"].mean()),
         "ci_by_metric": {"preference_accuracy": bootstrap_ci(s["correct"], samples, seed)}}
    if s["margin"] is not None:
        m["reward_margin"] = float(s["margin"].mean())
        m["ci_by_metric"]["reward_margin"] = bootstrap_ci(s["margin"], samples, seed)
    nll, tokens = -logp[:, 0], count[:, 0]
    loss = float(nll.sum() / max(tokens.sum(), 1))
    m.update(loss=loss, perplexity=perplexity(loss))
    m["ci_by_metric"]["perplexity"] = perplexity_ci(nll, tokens, samples, seed)
    return m


def evaluate(cfg, space, splits, y: dict, predictor, baselines: dict) -> tuple[dict, None]:
    from tuneforge.errors import ConfigError
    from tuneforge.tasks.causal_lm.preference import pair_logps

    key = cfg.eval.metric or "preference_accuracy"
    if key not in ("preference_accuracy", "reward_margin", "perplexity"):
        raise ConfigError(f"eval.metric {key} scores generations against one reference answer; preference pairs are "
                          "scored by how the model ranks their answers",
                          fix="leave eval.metric null (preference_accuracy), or choose reward_margin or perplexity")
    test = y["test"]
    reference = np.asarray(baselines["reference"]["logps"], dtype=float).reshape(-1, 2)
    logp, count = pair_logps(predictor.model, list(test), predictor.pad_id, cfg.eval.batch_size, predictor.precision)
    model = _scored(cfg, logp, count, reference, ranked_by_reward=True)
    scored = {}
    if "reference" in cfg.eval.baselines:
        scored["reference"] = _scored(cfg, reference, np.asarray(baselines["reference"]["tokens"]).reshape(-1, 2), None,
                                      ranked_by_reward=False)
        scored["reference"].pop("reward_margin", None)
    if "length" in baselines:
        lengths = np.asarray(baselines["length"]["lengths"], dtype=float).reshape(-1, 2)
        correct = (lengths[:, 0] > lengths[:, 1]) + 0.5 * (lengths[:, 0] == lengths[:, 1])
        from tuneforge.tasks.causal_lm.metrics import bootstrap_ci

        scored["length"] = {"preference_accuracy": float(correct.mean()),
                            "ci_by_metric": {"preference_accuracy": bootstrap_ci(correct.astype(float), cfg.eval.bootstrap_samples,
                                                                                 cfg.train.seed)}}
    if SFT_BASELINE in baselines:
        b = baselines[SFT_BASELINE]
        scored[SFT_BASELINE] = _scored(cfg, np.asarray(b["logps"], dtype=float).reshape(-1, 2),
                                       np.asarray(b["tokens"], dtype=float).reshape(-1, 2), reference, ranked_by_reward=True)
    for m in [model, *scored.values()]:
        m["ci"] = (m.get("ci_by_metric") or {}).get(key)
    result = {"main_metric": key, "kind": space.kind, "labels": [],
              "test": {"model": model, "baselines": {n: s for n, s in scored.items() if s.get(key) is not None}},
              "max_new_tokens": space.max_new_tokens, "chat_template": space.template,
              "preference": {"beta": cfg.task.beta, "loss": cfg.task.preference_loss, "sft_weight": cfg.task.sft_weight,
                             "pairs": len(test)}}
    skipped = sorted(set(scored) - set(result["test"]["baselines"]))
    if skipped:
        result["baselines_without_" + key] = {n: scored[n] for n in skipped}
    result["samples"] = _samples(cfg, splits.test, predictor, space, baselines["reference"].get("samples") or {})
    return result, None


def _samples(cfg, test, predictor, space, base: dict) -> list[dict]:
    """Side by side for the report: prompt, chosen, rejected, the base model's and the tuned model's greedy answers."""
    prompts = sample_prompts(cfg, test)
    if not prompts:
        return []
    details = predictor.complete_details([predictor.prompt_of(m) for m in prompts.values()], space.max_new_tokens,
                                         cfg.eval.batch_size)
    first = {}
    for k, text in enumerate(test.texts):
        first.setdefault(text, k)
    return [{"prompt": text, "reference": test.labels[first[text]], "rejected": test.extras["rejected"][first[text]],
             "base_zero_shot": base.get(text), "model": d["completion"]} for text, d in zip(prompts, details)]


def summary_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    from tuneforge.tasks.base import metric_rows

    return metric_rows(metrics, ["preference_accuracy", "reward_margin", "loss", "perplexity"])
