"""Text classification (binary, multi-class, multi-label) behind the task seam: rows of text + label(s),
a sequence-classification head, accuracy / macro-F1 against majority, TF-IDF and frozen-probe baselines.

Each method is a hook the generic stages call (see tuneforge/tasks/__init__.py for the registry)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tuneforge.tasks.classification.labels import LabelSpace
from tuneforge.tasks.base import TaskDefaults


class ClassificationTask(TaskDefaults):
    name = "text-classification"
    model_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"  # peft keeps the classifier head trainable and saved

    # --- data ---
    def prepare(self, cfg):
        from tuneforge.tasks.classification.data import prepare_data

        return prepare_data(cfg.data, cfg.task, cfg.eval.slices, cfg.audit.near_duplicate_threshold, cfg.audit.leakage)

    def audit_sections(self, cfg, data, tokenizer, max_length: int) -> dict:
        from tuneforge.tasks.classification.audit import sections

        return sections(data.splits, cfg.task.multi_label, cfg.audit, cfg.data.seed)

    def load_tokenizer(self, model_dir: Path):
        from tuneforge.models.load import load_tokenizer

        return load_tokenizer(model_dir)

    def label_space(self, cfg, data) -> LabelSpace:
        return LabelSpace(tuple(data.labels), cfg.task.multi_label, cfg.task.threshold)

    def encode(self, cfg, tokenizer, space: LabelSpace, splits, max_length: int) -> tuple[dict, dict]:
        """(input ids per split, targets per split): one row per text, a class id or a multi-hot row."""
        from tuneforge.models.infer import encode

        ids = {name: encode(tokenizer, ex.texts, max_length) for name, ex in splits.items()}
        return ids, {name: space.encode(ex.labels) for name, ex in splits.items()}

    # --- model ---
    def load_model(self, model_dir: Path, space: LabelSpace, seed: int, trust_remote_code: bool = False):
        from tuneforge.tasks.classification.model import load_classifier

        return load_classifier(model_dir, space, seed, trust_remote_code)

    def describe_space(self, space: LabelSpace) -> str:
        return f"{len(space.labels)} labels"

    # --- baselines, before training (they do not depend on the fine-tuned model) ---
    def baselines(self, cfg, space: LabelSpace, splits, ids: dict, y: dict, model, pad_id: int, precision: str) -> dict:
        from tuneforge.models.infer import mean_pooled
        from tuneforge.tasks.classification.evaluate import baseline_predictions

        probe_features = None
        if "frozen_probe" in cfg.eval.baselines:
            n = len(ids["train"]) if not cfg.eval.probe_train_rows else min(cfg.eval.probe_train_rows, len(ids["train"]))
            probe_rows = np.random.default_rng(cfg.train.seed).permutation(len(ids["train"]))[:n]
            probe_ids = {"train": [ids["train"][i] for i in probe_rows], "val": ids["val"], "test": ids["test"]}
            probe_features = {k: mean_pooled(model.base_model, v, pad_id, cfg.eval.batch_size, precision)
                              for k, v in probe_ids.items()}
            probe_features["train_rows"] = probe_rows
        return baseline_predictions(space, cfg, splits, y, probe_features)

    # --- validation, inside the training loop ---
    def validator(self, cfg, space: LabelSpace, tokenizer, max_length: int, val_ids: list[list[int]], y_val: np.ndarray,
                  pad_id: int, precision: str):
        from tuneforge.tasks.classification.evaluate import validation_scores

        def validate(model) -> dict:
            return validation_scores(model, space, cfg.eval.metric, val_ids, y_val, pad_id, cfg.eval.batch_size, precision)

        return validate

    # --- test evaluation of the exported model, exactly as a user loads it ---
    def load_predictor(self, model_dir: Path, device="cpu", precision: str = "fp32"):
        from tuneforge.tasks.classification.predictor import Predictor

        return Predictor.load(model_dir, device, precision)

    def export_outputs(self, predictor, test, batch_size: int) -> tuple[list, list]:
        """Each test text's logits and label(s)."""
        from tuneforge.models.infer import encode, pad_id_of, predict_logits

        ids = encode(predictor.tokenizer, test.texts, predictor.max_length)
        logits = predict_logits(predictor.model, ids, pad_id_of(predictor.tokenizer), batch_size, "fp32", predictor.device)
        return list(logits), list(predictor.space.names(predictor.space.decide(predictor.space.probabilities(logits))))

    def settings(self, cfg, max_length: int, space=None) -> dict:
        """What the exported model's config.json keeps under `tuneforge` for predict and serve."""
        return {"task": self.name, "threshold": cfg.task.threshold, "max_length": max_length}

    def evaluate(self, cfg, space: LabelSpace, splits, y: dict, predictor, baselines: dict) -> tuple[dict, np.ndarray]:
        """(metrics.json content, the model's test outputs: probabilities)."""
        from tuneforge.tasks.classification.evaluate import evaluate_all

        test_probs = predictor.probabilities(splits.test.texts, cfg.eval.batch_size)
        return evaluate_all(space, cfg, splits, y, test_probs, baselines), test_probs

    def reference_profile(self, predictor, inputs: list[str], outputs: np.ndarray) -> dict:
        """What serving's drift monitor compares live traffic with: the test split as the model saw it."""
        from tuneforge.drift import NO_LABEL, profile_of

        names = list(predictor.space.labels) + ([NO_LABEL] if predictor.space.multi_label else [])
        return profile_of([self.input_size(t) for t in inputs], predictor.results(outputs), names)

    # --- serving: what metrics and the request log record of each prediction ---
    def label_names(self, predictor) -> list[str]:
        return list(predictor.space.labels)

    def observe(self, result: dict) -> tuple[list[str], float]:
        from tuneforge.drift import decision

        return decision(result)

    def prediction_table(self, texts: list[str], results: list[dict]) -> tuple[list[str], list[list[str]]]:
        """`tuneforge predict`'s table: columns after the text, and a row of cells per text."""
        rows = []
        for r in results:
            probs = "  ".join(f"{k} {v:.3f}" for k, v in sorted(r["probabilities"].items(), key=lambda kv: -kv[1]))
            rows.append([", ".join(r["label"]) if isinstance(r["label"], list) else r["label"], probs])
        return ["label", "probabilities"], rows

    def report_details(self, metrics: dict) -> list[str]:
        from tuneforge.tasks.classification.report import report_details

        return report_details(metrics)

    # --- the run's closing table ---
    def summary_rows(self, metrics: dict) -> tuple[list[str], list[list[str]]]:
        header = ["accuracy", "macro-F1", f"95% CI ({metrics['main_metric']})"]
        rows = []
        for name, m in [("fine-tuned model", metrics["test"]["model"])] + list(metrics["test"]["baselines"].items()):
            ci = m.get("ci")
            rows.append([name, f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}", f"{ci['low']:.4f}-{ci['high']:.4f}" if ci else "-"])
        return header, rows

    def card_facts(self, data_report: dict, model_settings: dict) -> dict:
        return {**super().card_facts(data_report, model_settings),
                "variant": "multi-label" if data_report.get("multi_label") else None}

    def intended_use(self, metrics: dict) -> str:
        """The model card's intended-use paragraph."""
        return ("Classifying texts like those it was trained on (see the data summary) into the labels above. It is\n"
                "not meant for other languages, domains or label sets, nor for decisions about people without a\n"
                "human review: check the slice results and limitations first.")


TASK = ClassificationTask()
