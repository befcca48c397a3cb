"""Sequence-to-sequence behind the task seam: an encoder-decoder (T5, BART, Pegasus, Marian, or the offline BERT2BERT
default) fine-tuned in full or with LoRA on source/target pairs, the loss on the target tokens, validation loss
picking the step (ROUGE on a validation sample in the history), and test generations scored by ROUGE-1/2/L/Lsum,
chrF and exact match against the lead, retrieval and untuned-model baselines."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tuneforge.tasks.base import TaskDefaults, metric_rows

AUTO_MAX_TARGET_CAP = 512
AUTO_MAX_NEW_TOKENS_CAP = 256


@dataclass
class Seq2SeqSpace:
    """How targets are trained and generated: their token limit, the generation length and beams, the prefix, and the
    model's start / end / pad ids."""
    max_target_length: int
    max_target_why: str
    max_new_tokens: int
    num_beams: int
    prefix: str
    ids: dict = field(default_factory=dict)
    longest_target: int = 0


class HeldOutTargets(list):
    """A validation split's encoded targets, with their texts (validation generations are scored against them)."""

    def __init__(self, targets, texts):
        super().__init__(targets)
        self.texts = list(texts)


class Seq2SeqTask(TaskDefaults):
    name = "seq2seq"
    model_class = "AutoModelForSeq2SeqLM"
    peft_task_type = "SEQ_2_SEQ_LM"

    # --- data and model references ---
    def resolve_model(self, ref: str):
        from tuneforge.tasks.seq2seq.model import convert_bert2bert, is_default

        return convert_bert2bert() if is_default(ref) else super().resolve_model(ref)

    def prepare(self, cfg):
        from tuneforge.errors import ConfigError
        from tuneforge.tasks.seq2seq.data import prepare

        if cfg.train.method == "frozen":
            raise ConfigError("train.method frozen is not offered for seq2seq: its decoder (and a warm-started one's new "
                              "cross-attention) must learn", fix="set train.method: full (the default) or lora")
        return prepare(cfg)

    def load_tokenizer(self, model_dir: Path):
        from tuneforge.models.load import load_tokenizer
        from tuneforge.tasks.seq2seq.model import check_seq2seq

        check_seq2seq(model_dir)  # before anything is read with a tokenizer of a model that cannot generate targets
        return load_tokenizer(model_dir)

    def _targets(self, tokenizer, space: Seq2SeqSpace, texts) -> list[list[int]]:
        from tuneforge.tasks.seq2seq.generate import encode_targets

        return encode_targets(tokenizer, list(texts), None, space.ids["decoder_start_token_id"], space.ids["eos_token_id"])

    def label_space(self, cfg, data, tokenizer=None) -> Seq2SeqSpace:
        """The target limit and generation length, by the training targets where the config leaves them to the data
        (`tokenizer`: the model's, when the caller holds it already)."""
        from tuneforge.tasks.seq2seq.model import special_ids

        model_dir = self.resolve_model(cfg.model.name)[0]
        tokenizer = tokenizer or self.load_tokenizer(model_dir)
        space = Seq2SeqSpace(0, "", 0, cfg.task.num_beams, cfg.task.prefix, special_ids(model_dir, tokenizer))
        lengths = [len(t) for t in self._targets(tokenizer, space, data.splits.train.labels)]
        space.longest_target = longest = max(lengths, default=16)
        if cfg.task.max_target_length:
            space.max_target_length, space.max_target_why = cfg.task.max_target_length, "task.max_target_length"
        else:
            space.max_target_length = min(AUTO_MAX_TARGET_CAP, -(-longest // 8) * 8)
            space.max_target_why = f"the longest training target, {longest} tokens (cap {AUTO_MAX_TARGET_CAP})"
        space.max_new_tokens = cfg.task.max_new_tokens or min(AUTO_MAX_NEW_TOKENS_CAP, int(np.ceil(1.25 * longest)))
        return space

    def describe_space(self, space: Seq2SeqSpace) -> str:
        how = "greedy" if space.num_beams == 1 else f"{space.num_beams} beams"
        return (f"source/target pairs, targets up to {space.max_target_length} tokens, generating up to "
                f"{space.max_new_tokens} ({how})")

    def token_lengths(self, cfg, tokenizer, data) -> dict:
        """Source tokens per row, prefix included (what max_length cuts)."""
        from tuneforge.tasks.seq2seq.generate import encode_sources

        return {name: np.array([len(x) for x in encode_sources(tokenizer, list(ex.texts), cfg.task.prefix, None)])
                for name, ex in data.splits.items()}

    def audit_sections(self, cfg, data, tokenizer, max_length: int) -> dict:
        from tuneforge.tasks.seq2seq.audit import sections

        space = self.label_space(cfg, data, tokenizer)
        lengths = {name: [len(t) for t in self._targets(tokenizer, space, ex.labels)] for name, ex in data.splits.items()}
        return sections(data, lengths, space.max_target_length, space.max_target_why)

    def encode(self, cfg, tokenizer, space: Seq2SeqSpace, splits, max_length: int) -> tuple[dict, dict]:
        from tuneforge.tasks.seq2seq.generate import encode_sources, encode_targets

        ids, y = {}, {}
        start = space.ids["decoder_start_token_id"]
        for name, ex in splits.items():
            ids[name] = encode_sources(tokenizer, list(ex.texts), space.prefix, max_length)
            targets = encode_targets(tokenizer, list(ex.labels), space.max_target_length, start, space.ids["eos_token_id"])
            y[name] = HeldOutTargets(targets, ex.labels) if name == "val" else targets
        return ids, y

    # --- model and training ---
    def load_model(self, model_dir: Path, space: Seq2SeqSpace, seed: int, trust_remote_code: bool = False):
        from tuneforge.tasks.seq2seq.model import load_seq2seq

        return load_seq2seq(model_dir, seed, trust_remote_code)

    def lora_targets(self):
        return "all-linear"

    def collate(self, examples: list[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict:
        """Sources padded with their attention mask; labels (the decoder's own length) padded with -100. The model
        builds its decoder inputs from the labels (shifted right after its start token)."""
        from tuneforge.tasks.seq2seq.generate import batch

        return batch(examples, pad_id, pad_to_multiple_of)

    def training_loss(self, cfg):
        from tuneforge.tasks.seq2seq.generate import target_loss

        return target_loss

    def selection(self, cfg) -> tuple[str, str]:
        return "val_loss", "min"

    def validator(self, cfg, space: Seq2SeqSpace, tokenizer, max_length: int, val_ids, val: HeldOutTargets, pad_id: int,
                  precision: str):
        """The validation loss (it picks the step) and, on the first task.val_generations rows, the generations' scores
        (the training history shows them)."""
        from tuneforge.tasks.seq2seq.generate import Seq2SeqPredictor, example_losses, mean_loss, perplexity
        from tuneforge.tasks.seq2seq.metrics import per_example

        n_gen = min(cfg.task.val_generations, len(val_ids))
        settings = self.settings(cfg, max_length, space)

        def validate(model) -> dict:
            loss = mean_loss(*example_losses(model, val_ids, list(val), pad_id, cfg.eval.batch_size, precision))
            row = {"val_loss": loss}
            if n_gen:
                device = next(model.parameters()).device
                predictor = Seq2SeqPredictor(model, tokenizer, {**settings, "ids": space.ids}, device, precision)
                out = predictor.generate_from(val_ids[:n_gen], space.max_new_tokens, cfg.eval.batch_size)
                scores = per_example([o["generation"] for o in out], val.texts[:n_gen])
                row.update({f"val_{k}": float(v.mean()) for k, v in scores.items()})
            row["val_perplexity"] = perplexity(loss)
            return row

        return validate

    def settings(self, cfg, max_length: int, space: Seq2SeqSpace | None = None) -> dict:
        return {"task": self.name, "max_length": max_length, "prefix": cfg.task.prefix,
                "num_beams": space.num_beams if space else cfg.task.num_beams,
                "max_new_tokens": space.max_new_tokens if space else 64,
                "max_target_length": space.max_target_length if space else None}

    def export(self, cfg, model_dir: Path, tokenizer, space: Seq2SeqSpace) -> None:
        from tuneforge.tasks.seq2seq.model import write_generation_config

        write_generation_config(model_dir, space.ids, space.num_beams, space.max_new_tokens)

    # --- baselines and evaluation ---
    def baselines(self, cfg, space: Seq2SeqSpace, splits, ids, y, model, pad_id: int, precision: str) -> dict:
        from tuneforge.models.load import load_tokenizer
        from tuneforge.tasks.seq2seq.baselines import baselines
        from tuneforge.tasks.seq2seq.generate import Seq2SeqPredictor

        tokenizer = load_tokenizer(self.resolve_model(cfg.model.name)[0])
        predictor = Seq2SeqPredictor(model, tokenizer, {**self.settings(cfg, cfg.model.max_length, space), "ids": space.ids},
                                     next(model.parameters()).device, precision)
        return baselines(cfg, space, splits, ids, y, predictor)  # the test sources as encoded for the tuned model

    def load_predictor(self, model_dir: Path, device="cpu", precision: str = "fp32"):
        from tuneforge.tasks.seq2seq.generate import Seq2SeqPredictor

        return Seq2SeqPredictor.load(model_dir, device, precision)

    def evaluate(self, cfg, space: Seq2SeqSpace, splits, y: dict, predictor, baselines: dict) -> tuple[dict, list[dict]]:
        from tuneforge.tasks.seq2seq.evaluate import evaluate

        return evaluate(cfg, space, splits, y, predictor, baselines)

    def summary_rows(self, metrics: dict) -> tuple[list[str], list[list[str]]]:
        keys = ["loss", "perplexity", "exact_match", "rouge_1", "rouge_2", "rouge_l", "rouge_lsum", "chrf"]
        return metric_rows(metrics, keys)

    def report_details(self, metrics: dict) -> list[str]:
        from tuneforge.tasks.seq2seq.report import report_details

        return report_details(metrics)

    def prediction_table(self, texts: list[str], results: list[dict]) -> tuple[list[str], list[list[str]]]:
        return ["generation"], [[r["generation"]] for r in results]

    def intended_use(self, metrics: dict) -> str:
        return ("Writing a target text (a summary, an extraction into a fixed form, a rewrite) from a source text like\n"
                "the training sources. "
                + ("Greedy decoding" if (metrics.get("num_beams") or 1) == 1 else f"Beam search ({metrics['num_beams']} beams)")
                + " is what was evaluated (see generation_config.json). It can state things the source does not say:\n"
                "review its output before it reaches people, and check the sample generations in the run's report.")

    def card_facts(self, data_report: dict, model_settings: dict) -> dict:
        prefix = model_settings.get("prefix") or ""
        load = ("```python\nfrom transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n"
                "model = AutoModelForSeq2SeqLM.from_pretrained(\"PATH/TO/model\")\n"
                "tokenizer = AutoTokenizer.from_pretrained(\"PATH/TO/model\")\n"
                f"inputs = tokenizer([{json.dumps(prefix + 'your source text')}], return_tensors=\"pt\")\n"
                "print(tokenizer.batch_decode(model.generate(**inputs), skip_special_tokens=True))  # generation_config.json: as evaluated\n"
                "```\n"
                "or `tuneforge predict RUN_DIR --text \"...\"`" + (f" (it puts the prefix {prefix!r} before each source)." if prefix else "."))
        inputs = f"Sources are cut to {model_settings.get('max_length')} tokens, as in training"
        inputs += f", after the prefix {prefix!r}." if prefix else "."
        return {"variant": None, "inputs": inputs, "load": load}

    # --- serving, predict and drift ---
    def read_inputs(self, values: list[str], path: Path | None, column: str | None, run_dir: Path) -> list:
        """As the default (texts given, a .txt file's lines, a table's column), the table's source column found as in
        training when --text-column is not given: the run's task.source_column, else source, prompt or input."""
        if path is not None and path.suffix != ".txt" and column is None and path.is_file():
            import yaml

            from tuneforge.data.load import read_table
            from tuneforge.tasks.seq2seq.data import COLUMN_PAIRS

            config = Path(run_dir) / "config.yaml"
            named = (yaml.safe_load(config.read_text()).get("task") or {}).get("source_column") if config.is_file() else None
            found = [str(c) for c in read_table(path).columns]
            column = next((c for c in [named, *(s for s, _ in COLUMN_PAIRS)] if c and c in found), None)
        return super().read_inputs(values, path, column, run_dir)

    # a generation is watched as the causal LM's completion is: empty, cut at max_tokens, and its length
    def label_names(self, predictor) -> list[str]:
        from tuneforge.tasks.causal_lm.task import TASK as LM

        return LM.label_names(predictor)

    def observe(self, result: dict) -> tuple[list[str], float]:
        """(labels, confidence) of a generation for metrics, the request log and drift: (empty) or (truncated), else
        none; the confidence is output tokens / max_tokens, so the signal follows the output length."""
        from tuneforge.tasks.causal_lm.task import TASK as LM

        return LM.observe({"completion": result["generation"], "finish_reason": result.get("finish_reason"),
                           "completion_tokens": result.get("output_tokens", 0), "max_tokens": result.get("max_tokens")})

    def reference_profile(self, predictor, inputs: list[str], outputs: list[dict]) -> dict:
        """The test sources' lengths and the generations as serving observes them (see observe)."""
        from tuneforge.tasks.causal_lm.task import CausalLMTask

        return CausalLMTask.reference_profile(self, predictor, inputs, outputs)


TASK = Seq2SeqTask()
