"""The cheap baselines a fine-tuned LLM must beat, on the same test prompts: the untuned model as it is
(`base_zero_shot`, same template; also its loss and perplexity), the untuned model shown the three most
similar training examples first (`base_few_shot`), and the completion of the most similar training prompt
(`retrieval`, TF-IDF). Plain-text data has nothing to generate against: only the base model's loss."""
from __future__ import annotations

from tuneforge.tasks.causal_lm.encoding import plain_prompt


def few_shot_messages(shots: list[list[dict]], query: list[dict]) -> list[dict]:
    """The shots' turns (system messages dropped), then the query's own conversation."""
    turns = [m for conv in shots for m in conv if m["role"] != "system"]
    system = [m for m in query[:1] if m["role"] == "system"]
    return system + turns + [m for m in query if m["role"] != "system"]


def few_shot_prompt(predictor, shots: list[list[dict]], query: list[dict]) -> list[int]:
    if predictor.template:
        return predictor.prompt_of(few_shot_messages(shots, query))
    text = "\n\n".join(plain_prompt(s[:-1]) + s[-1]["content"] for s in shots) + "\n\n" + plain_prompt(query)
    return list(predictor.tokenizer(text, add_special_tokens=True)["input_ids"])


def baselines(cfg, space, splits, y: dict, predictor, precision: str) -> dict:
    from tuneforge.tasks.causal_lm.generate import example_losses, mean_loss, perplexity
    from tuneforge.tasks.causal_lm.metrics import TfidfIndex, retrieval_baseline

    wanted, out = cfg.eval.baselines, {}
    test = splits.test
    if "base_zero_shot" in wanted:
        # fp32, as the fine-tuned export is scored: a loss gap must not come from the arithmetic
        nll, count = example_losses(predictor.model, y["test"], predictor.pad_id, cfg.eval.batch_size, "fp32")
        loss = mean_loss(nll, count)
        out["base_zero_shot"] = {"loss": loss, "perplexity": perplexity(loss), "nll": nll.tolist(), "tokens": count.tolist()}
    if space.kind == "text":
        return out
    queries = [m[:-1] for m in test.extras["messages"]]
    if "base_zero_shot" in wanted:
        prompts = [predictor.prompt_of(q) for q in queries]
        out["base_zero_shot"]["generations"] = predictor.complete_ids(prompts, space.max_new_tokens, cfg.eval.batch_size)
    if "base_few_shot" in wanted:
        train_msgs = splits.train.extras["messages"]
        near = TfidfIndex(list(splits.train.texts)).nearest(list(test.texts), cfg.task.few_shot)
        prompts = [few_shot_prompt(predictor, [train_msgs[j] for j in js[::-1]], q)  # the most similar last, nearest the query
                   for js, q in zip(near, queries)]
        out["base_few_shot"] = {"generations": predictor.complete_ids(prompts, space.max_new_tokens, cfg.eval.batch_size)}
    if "retrieval" in wanted:
        out["retrieval"] = {"generations": retrieval_baseline(list(splits.train.texts), list(splits.train.labels),
                                                              list(test.texts))}
    return out
