"""Causal LM behind the task seam: instruction tuning (prompt/completion pairs, chats), domain adaptation (plain
text) and preference tuning (DPO on chosen / rejected pairs: preference.py, preference_eval.py) of a generative LLM,
LoRA by default, packed rows, validation loss for early stopping, and test generations scored by exact match,
ROUGE-L and chrF against the untuned model (zero- and few-shot) and a retrieval baseline (pairs: preference accuracy
against the reference model's ranking, the longer answer, and SFT on the chosen answers)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuneforge.errors import DataError
from tuneforge.tasks.base import TaskDefaults, metric_rows
from tuneforge.tasks.causal_lm.encoding import Encoded

NO_COMPLETION = "(empty)"  # drift and serving: a completion that came back empty
TRUNCATED = "(truncated)"  # ... one that ran out of max_tokens before a stop token
AUTO_MAX_NEW_TOKENS_CAP = 256
AUTO_MAX_LENGTH_CAP = 1024  # packed rows; attention costs grow with the row, a model's limit may be lower
MIN_PACKED_ROW = 256        # short examples pack better into rows of at least this many tokens


@dataclass
class LMSpace:
    """What the data is: its kind (pair, chat, text, preference), the closed set of completions when there is one, and the
    generation length resolved from the training completions."""
    kind: str
    classes: list[str] | None = None
    max_new_tokens: int = 64
    template: bool = True


class PackedLabels(list):
    """Training rows' labels, with the rows' position ids (restarting per packed example) beside them."""

    def __init__(self, labels, positions):
        super().__init__(labels)
        self.positions = positions


class HeldOutExamples(list):
    """A validation or test split's encoded examples, with the split row each comes from (a plain text may give
    several chunks)."""

    def __init__(self, examples, row_of):
        super().__init__(examples)
        self.row_of = row_of

    def subset(self, positions: list[int]) -> "HeldOutExamples":
        return HeldOutExamples([self[i] for i in positions], [self.row_of[i] for i in positions])


def _messages(ex, k: int, system_prompt: str | None) -> list[dict]:
    from tuneforge.tasks.causal_lm.encoding import with_system

    return with_system(ex.extras["messages"][k], system_prompt)


def render(cfg, tokenizer, ex, template: bool, max_length: int | None = None) -> list[list[Encoded]]:
    """Each example of a split as encoded pieces: one for a pair or chat, consecutive chunks for a text."""
    from tuneforge.tasks.causal_lm.encoding import encode_chat, encode_text

    out = []
    for k in range(len(ex)):
        if ex.extras["kind"][k] == "text":
            out.append(encode_text(tokenizer, ex.extras["text"][k], max_length or 10**9))
        else:
            out.append([encode_chat(tokenizer, _messages(ex, k, cfg.task.system_prompt), template)])
    return out


class CausalLMTask(TaskDefaults):
    name = "causal-lm"
    model_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"

    # --- data ---
    def prepare(self, cfg):
        from tuneforge.tasks.causal_lm.data import prepare

        return prepare(cfg)

    def load_tokenizer(self, model_dir: Path):
        from tuneforge.tasks.causal_lm.model import check_causal_lm, load_lm_tokenizer

        check_causal_lm(model_dir)  # before anything is read with a tokenizer that cannot generate
        return load_lm_tokenizer(model_dir)

    def label_space(self, cfg, data) -> LMSpace:
        from tuneforge.tasks.causal_lm.metrics import closed_set

        kind = data.report["kind"]
        classes = None if kind in ("text", "preference") else closed_set(data.splits.train.labels, data.splits.test.labels)
        return LMSpace(kind, classes)

    def describe_space(self, space: LMSpace) -> str:
        what = {"pair": "prompt/completion pairs", "chat": "chats", "text": "plain text",
                "preference": "preference pairs (chosen / rejected), trained by DPO"}[space.kind]
        return what + (f", completions from a closed set of {len(space.classes)}" if space.classes else "")

    def token_lengths(self, cfg, tokenizer, data) -> dict:
        """Tokens per example as trained (template, completion and EOS included; a text whole)."""
        from tuneforge.tasks.causal_lm.encoding import uses_template

        template = uses_template(tokenizer, cfg.task.chat_template)
        if data.report["kind"] == "preference":  # a pair's longer side: what max_length must hold
            from tuneforge.tasks.causal_lm.preference import render_pairs

            return {name: np.array([max(len(p.chosen.ids), len(p.rejected.ids)) for p in render_pairs(cfg, tokenizer, ex, template)])
                    for name, ex in data.splits.items()}
        return {name: np.array([sum(len(p.ids) for p in pieces) for pieces in render(cfg, tokenizer, ex, template)])
                for name, ex in data.splits.items()}

    def max_length(self, cfg, train_lengths: np.ndarray, tokenizer, model_dir: Path) -> tuple[int, str]:
        """model.max_length, or by the data: the longest training example (a multiple of 64, at least 256 so short
        examples pack well), at most 1024 and the model's context."""
        import json

        if cfg.model.max_length is not None:
            return cfg.model.max_length, "model.max_length"
        limits = [AUTO_MAX_LENGTH_CAP]
        positions = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
        if positions:
            limits.append(int(positions))
        longest = int(train_lengths.max()) if len(train_lengths) else MIN_PACKED_ROW
        chosen = min(min(limits), max(MIN_PACKED_ROW, -(-longest // 64) * 64))
        return chosen, f"the longest training example, {longest} tokens (cap {min(limits)})"

    def audit_sections(self, cfg, data, tokenizer, max_length: int) -> dict:
        from tuneforge.tasks.causal_lm.audit import sections
        from tuneforge.tasks.causal_lm.encoding import uses_template

        template = uses_template(tokenizer, cfg.task.chat_template)
        if data.report["kind"] == "preference":
            from tuneforge.tasks.causal_lm.preference import render_pairs
            from tuneforge.tasks.causal_lm.preference_eval import audit_sections

            pairs = {name: render_pairs(cfg, tokenizer, ex, template) for name, ex in data.splits.items()}
            return audit_sections(data, pairs, tokenizer, max_length, template)
        rendered = {name: render(cfg, tokenizer, ex, template, max_length) for name, ex in data.splits.items()}
        return sections(data, rendered, tokenizer, max_length, template, cfg.audit)

    def encode(self, cfg, tokenizer, space: LMSpace, splits, max_length: int) -> tuple[dict, dict]:
        """Training: packed rows (ids, labels, positions). Validation and test: one encoded example each, for the
        loss; their prompts are what generation starts from."""
        from tuneforge.tasks.causal_lm.encoding import fit, pack, trainable, uses_template

        space.template = uses_template(tokenizer, cfg.task.chat_template)
        if space.kind == "preference":
            from tuneforge.tasks.causal_lm.preference import encode_preference

            return encode_preference(cfg, tokenizer, space, splits, max_length)
        ids, y = {}, {}
        for name, ex in splits.items():
            pieces = render(cfg, tokenizer, ex, space.template, max_length)
            for k, p in enumerate(pieces):
                if p and p[0].prompt_len >= max_length:
                    raise DataError(f"the prompt is {p[0].prompt_len} tokens, which leaves no room for the completion "
                                    f"within max_length {max_length}", path=ex.source, row=ex.rows[k],
                                    column=cfg.task.messages_column if space.kind == "chat" else cfg.task.prompt_column,
                                    fix="raise model.max_length, or shorten that prompt")
            examples = [fit(e, max_length) for p in pieces for e in p]
            row_of = [k for k, p in enumerate(pieces) for _ in p]
            if name == "train":
                examples = [e for e in examples if trainable(e)]
                rows, labels, positions = pack(examples, max_length, cfg.task.packing)
                ids[name], y[name] = rows, PackedLabels(labels, positions)
                completions = [len(e.ids) - e.prompt_len for e in examples]  # the last answer: what is generated
                longest = max(completions) if completions and space.kind != "text" else 48
                space.max_new_tokens = cfg.task.max_new_tokens or min(AUTO_MAX_NEW_TOKENS_CAP, int(np.ceil(1.25 * longest)))
            else:
                ids[name], y[name] = [e.ids for e in examples], HeldOutExamples(examples, row_of)
        return ids, y

    def test_subset(self, splits, y: dict, baselines: dict, keep: list[int]):
        """As the default, with the test examples (and the baselines' per-example losses) taken by their row: a
        plain text's chunks go with it."""
        import dataclasses

        from tuneforge.tasks.base import take

        examples = y["test"]
        wanted = set(keep)
        positions = [i for i, r in enumerate(examples.row_of) if r in wanted]
        cut_examples = examples.subset(positions)
        n, n_examples = len(splits.test), len(examples)
        cut_baselines = {}
        for name, b in baselines.items():
            per_example = {k: take(v, positions, n_examples) for k, v in b.items() if k in ("nll", "tokens", "logps", "lengths")}
            cut_baselines[name] = {**take({k: v for k, v in b.items() if k not in per_example}, keep, n), **per_example}
        return dataclasses.replace(splits, test=splits.test.subset(keep)), {**y, "test": cut_examples}, cut_baselines

    # --- model ---
    def load_model(self, model_dir: Path, space: LMSpace, seed: int, trust_remote_code: bool = False):
        from tuneforge.tasks.causal_lm.model import load_causal_lm

        return load_causal_lm(model_dir, seed, trust_remote_code)

    def collate(self, examples: list[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict:
        """As the default; packed rows (examples with position_ids) carry their positions instead of an attention
        mask (encoding.packed_batch)."""
        from tuneforge.tasks.causal_lm.encoding import packed_batch

        if isinstance(examples[0]["labels"], dict):  # packed preference pairs
            from tuneforge.tasks.causal_lm.preference import collate_pairs

            return collate_pairs(examples, pad_id, pad_to_multiple_of)
        if "position_ids" not in examples[0]:
            return super().collate(examples, pad_id, pad_to_multiple_of)
        rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
        return packed_batch(super().collate(rows, pad_id, pad_to_multiple_of), [e["position_ids"] for e in examples])

    def lora_targets(self):
        return "all-linear"

    def training_loss(self, cfg):
        """The packed SFT loss, or on preference batches (collate_pairs: they carry reference log-probs) the
        preference loss task.preference_loss with task.beta and task.sft_weight."""
        from tuneforge.tasks.causal_lm.generate import packed_loss
        from tuneforge.tasks.causal_lm.preference import preference_loss

        prefer = preference_loss(cfg.task.beta, cfg.task.preference_loss, cfg.task.sft_weight)

        def loss(model, batch: dict):
            return prefer(model, batch) if "reference" in batch else packed_loss(model, batch)

        return loss

    def before_training(self, cfg, space: LMSpace, ids: dict, y: dict, model, pad_id: int, precision: str) -> None:
        """Preference pairs: the starting model's log-probs of the training and validation pairs (the reference)."""
        if space.kind == "preference":
            from tuneforge.tasks.causal_lm.preference import compute_reference

            compute_reference(cfg, y, model, pad_id, precision)

    def trained_baselines(self, cfg, space: LMSpace, ids: dict, y: dict, max_length: int) -> dict:
        """Preference pairs: `sft_chosen`, the SFT path on the chosen answers alone (the same rows' prompts, packed as
        SFT packs them; validation on the chosen answers' loss)."""
        import dataclasses

        from tuneforge.tasks.causal_lm.encoding import pack, trainable

        if space.kind != "preference" or "sft_chosen" not in cfg.eval.baselines:
            return {}
        chosen = [p.chosen for p in y["train"].pairs if trainable(p.chosen)]
        rows, labels, positions = pack(chosen, max_length, cfg.task.packing)
        val = [p.chosen for p in y["val"]]
        return {"sft_chosen": (dataclasses.replace(space, kind="pair"),
                               {"train": rows, "val": [e.ids for e in val], "test": []},
                               {"train": PackedLabels(labels, positions), "val": HeldOutExamples(val, list(range(len(val)))),
                                "test": []})}

    def score_trained_baseline(self, cfg, name: str, space: LMSpace, splits, y: dict, model, pad_id: int) -> dict:
        from tuneforge.tasks.causal_lm.preference_eval import score_sft

        return score_sft(cfg, y, model, pad_id)

    def selection(self, cfg) -> tuple[str, str]:
        return "val_loss", "min"

    def search_space(self, cfg, n_layers: int | None, epochs: float | None = None) -> dict:
        """LoRA's rate, rank and scale, and few passes: an LLM memorises small data within 1-3 epochs."""
        space = {"train.learning_rate": {"low": 1e-4, "high": 1e-3, "log": True},
                 "train.epochs": {"low": 1, "high": 3},
                 "train.warmup_ratio": [0.0, 0.06, 0.1]}
        if cfg.train.method == "lora":
            # alpha searched on its own: alpha / r is the adapters' scale, so r alone would change it too
            space |= {"train.lora.r": [8, 16, 32], "train.lora.alpha": [16, 32, 64]}
        return space

    def settings(self, cfg, max_length: int, space: LMSpace | None = None) -> dict:
        return {"task": self.name, "max_length": max_length, "chat_template": cfg.task.chat_template,
                "system_prompt": cfg.task.system_prompt, "format": space.kind if space else "pair",
                "max_new_tokens": space.max_new_tokens if space else 64}

    def export(self, cfg, model_dir: Path, tokenizer, space: LMSpace) -> None:
        from tuneforge.tasks.causal_lm.generate import stop_ids
        from tuneforge.tasks.causal_lm.model import write_generation_config

        write_generation_config(model_dir, tokenizer, stop_ids(tokenizer), space.max_new_tokens)

    # --- baselines: the untuned model, zero- and few-shot, and retrieval ---
    def baselines(self, cfg, space: LMSpace, splits, ids, y, model, pad_id: int, precision: str) -> dict:
        if space.kind == "preference":
            from tuneforge.tasks.causal_lm.preference_eval import baselines as preference_baselines

            return preference_baselines(cfg, space, splits, y, self._predictor(model, cfg, space, precision))
        from tuneforge.tasks.causal_lm.baselines import baselines

        return baselines(cfg, space, splits, y, self._predictor(model, cfg, space, precision), precision)

    def _predictor(self, model, cfg, space, precision, tokenizer=None):
        from tuneforge.tasks.causal_lm.generate import CompletionPredictor
        from tuneforge.tasks.causal_lm.model import load_lm_tokenizer
        from tuneforge.models.resolve import resolve_model

        tokenizer = tokenizer or load_lm_tokenizer(resolve_model(cfg.model.name))
        settings = self.settings(cfg, cfg.model.max_length or 0, space)
        return CompletionPredictor(model, tokenizer, settings, next(model.parameters()).device, precision)

    # --- validation inside the loop: the loss on the validation examples' completions ---
    def validator(self, cfg, space: LMSpace, tokenizer, max_length: int, val_ids, val: list[Encoded], pad_id: int,
                  precision: str):
        from tuneforge.tasks.causal_lm.generate import example_losses, mean_loss, perplexity

        if space.kind == "preference":
            from tuneforge.tasks.causal_lm.preference import validator

            return validator(cfg, val, pad_id, precision)

        def validate(model) -> dict:
            loss = mean_loss(*example_losses(model, val, pad_id, cfg.eval.batch_size, precision))
            return {"val_loss": loss, "val_perplexity": perplexity(loss)}

        return validate

    # --- test evaluation of the exported model ---
    def export_outputs(self, predictor, test, batch_size: int) -> tuple[list, list]:
        """Each test prompt's log-probabilities (of the next token, and of each of its own tokens) and its top next
        token (plain text: the first 64 tokens of each text)."""
        from tuneforge.tasks.causal_lm.generate import prompt_logprobs

        if "messages" in test.extras:
            prompts = [predictor.fit_prompt(predictor.prompt_of(m[:-1])) for m in test.extras["messages"]]
        else:
            prompts = [predictor.text_prompt(t)[:64] for t in test.texts]
        return prompt_logprobs(predictor.model, prompts, predictor.pad_id, batch_size)

    def load_predictor(self, model_dir: Path, device="cpu", precision: str = "fp32"):
        from tuneforge.tasks.causal_lm.generate import CompletionPredictor

        return CompletionPredictor.load(model_dir, device, precision)

    def evaluate(self, cfg, space: LMSpace, splits, y: dict, predictor,
                 baselines: dict) -> tuple[dict, list[dict] | None]:
        if space.kind == "preference":
            from tuneforge.tasks.causal_lm.preference_eval import evaluate as evaluate_pairs

            return evaluate_pairs(cfg, space, splits, y, predictor, baselines)
        from tuneforge.tasks.causal_lm.evaluate import evaluate

        return evaluate(cfg, space, splits, y, predictor, baselines)

    def reference_profile(self, predictor, inputs: list[str], outputs: list[dict] | None) -> dict:
        """The test split's prompts and greedy generations as serving observes completions (see observe): prompt
        length, how a completion ended ((empty), (truncated) or neither) and its length as a share of max_tokens.
        Plain text has no generations at training time: its reference watches the input length only."""
        from tuneforge.drift import logged_label, profile

        if outputs is None:
            p = profile([self.input_size(t) for t in inputs], [""] * len(inputs), [1.0] * len(inputs), [])
            return {"n": p["n"], "length": p["length"]}
        observed = [self.observe(o) for o in outputs]
        p = profile([self.input_size(t) for t in inputs], [logged_label(labs) for labs, _ in observed], [c for _, c in observed],
                    self.label_names(predictor))
        p.pop("count")  # one label at most per completion: nothing to count
        return p

    # --- serving and predict ---
    def label_names(self, predictor) -> list[str]:
        from tuneforge.drift import NO_LABEL

        return [NO_COMPLETION, TRUNCATED, NO_LABEL]

    def observe(self, result: dict) -> tuple[list[str], float]:
        """(labels, confidence) of a completion for metrics, the request log and drift: (empty) or (truncated), else
        none; the confidence is completion tokens / max_tokens, so the signal follows the output length."""
        if not result["completion"]:
            labels = [NO_COMPLETION]
        elif result.get("finish_reason") == "length":
            labels = [TRUNCATED]
        else:
            labels = []
        return labels, min(1.0, result.get("completion_tokens", 0) / max(1, result.get("max_tokens") or 1))

    def mount_routes(self, app, ctx) -> None:
        """The OpenAI API: /v1/chat/completions, /v1/completions and /v1/models, on a batching generation engine."""
        from tuneforge.tasks.causal_lm.serve import mount

        mount(app, ctx)

    def prediction_table(self, texts: list[str], results: list[dict]) -> tuple[list[str], list[list[str]]]:
        return ["completion"], [[r["completion"]] for r in results]

    def intended_use(self, metrics: dict) -> str:
        what = {"text": "continuing text like the training text (domain or style adaptation)",
                "preference": "answering prompts like the training prompts, preferring answers like the chosen ones "
                              "over answers like the rejected ones (DPO)"}.get(
            metrics.get("kind"), "answering prompts like the training prompts, in the style of the training completions")
        return (f"Generating text: {what}. Greedy decoding is what was evaluated (see generation_config.json). It can\n"
                "state false things fluently and repeats what its training data says: review its output before it\n"
                "reaches people, and check the sample generations in the run's report.")

    def report_details(self, metrics: dict) -> list[str]:
        from tuneforge.tasks.causal_lm.report import report_details

        return report_details(metrics)

    def summary_rows(self, metrics: dict) -> tuple[list[str], list[list[str]]]:
        if metrics.get("kind") == "preference":
            from tuneforge.tasks.causal_lm.preference_eval import summary_rows

            return summary_rows(metrics)
        keys = ["loss", "perplexity"] + ([] if metrics.get("kind") == "text" else ["exact_match", "rouge_l", "chrf"])
        keys += [k for k in ("accuracy", "macro_f1") if k in metrics["test"]["model"]]
        return metric_rows(metrics, keys)


TASK = CausalLMTask()
