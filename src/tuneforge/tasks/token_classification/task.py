"""Token classification behind the task seam: sentences of words with BIO tags, a token-classification
head trained on each word's first sub-word, long sentences in overlapping windows, entity-level F1
(seqeval, strict) against majority, gazetteer and CRF baselines."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuneforge.tasks.token_classification.encoding import LabelSet
from tuneforge.tasks.token_classification.sentence import Sentence, entities
from tuneforge.tasks.base import TaskDefaults

NO_ENTITY = "(none)"  # a text with no entity, in serving metrics and drift profiles


@dataclass
class GoldSplit:
    """A held-out split as the validator and the evaluation need it: words and gold tags per sentence."""
    tokens: list[list[str]]
    tags: list[list[str]]


def _sentences(ex) -> list[Sentence]:
    return [Sentence(tokens, list(tags), text=text) for tokens, tags, text in zip(ex.extras["tokens"], ex.labels, ex.texts)]


def _type_counts(labels) -> dict[str, int]:
    return dict(sorted(Counter(kind for tags in labels for kind, _, _ in entities(list(tags))).items()))


class TokenClassificationTask(TaskDefaults):
    name = "token-classification"
    model_class = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"

    # --- data ---
    def prepare(self, cfg):
        from tuneforge.data.prepare import assemble, held_out_files

        main, main_info, removed, repairs, long_texts = self._read(cfg.data.path, cfg)
        files, held = [main_info], {}
        for role, ref in held_out_files(cfg.data).items():  # taken as given: duplicates reported, not removed
            ex, info, more_removed, more_repairs, more_long = self._read(ref, cfg, as_given=True)
            files.append({**info, "role": role})
            removed += more_removed
            repairs += more_repairs
            long_texts += more_long
            held[role] = ex
        # stratify on the sentence's first entity type: rare types reach every split
        strata = [(entities(list(tags)) or [(NO_ENTITY,)])[0][0] for tags in main.labels]
        report = {"scheme_repairs": repairs, "repairs": len(repairs), "long_texts": long_texts}
        return assemble(main, held, files, removed, cfg.data, cfg.audit.near_duplicate_threshold, report,
                        _type_counts, strata=strata, leakage=cfg.audit.leakage)

    def _read(self, ref: str, cfg, as_given: bool = False):
        from tuneforge.data.clean import Examples
        from tuneforge.data.load import file_sha256, resolve_path
        from tuneforge.errors import DataError
        from tuneforge.tasks.token_classification.readers import detect_token_format, read_sentences
        from tuneforge.tasks.token_classification.sentence import cut_sentence

        path = resolve_path(ref)
        fmt = cfg.data.format if cfg.data.format in ("csv", "jsonl", "xlsx") else "auto"
        sentences, repairs = read_sentences(path, fmt=fmt, scheme=cfg.task.scheme, strict=cfg.task.strict,
                                            text_column=cfg.data.text_column, encoding=cfg.data.encoding,
                                            sheet=cfg.data.sheet)
        seen: dict[tuple, int] = {}
        kept, removed, long_texts = [], [], []
        for s in sentences:
            if len(s.text) > cfg.data.max_text_chars:  # cut (whole words) before the tokenizer sees it
                field, chars = (cfg.data.text_column if s.text != " ".join(s.tokens) else "tokens"), len(s.text)
                s = cut_sentence(s, cfg.data.max_text_chars)
                long_texts.append({"file": str(path), "row": s.row, "field": field, "chars": chars, "kept": len(s.text)})
            key = (tuple(s.tokens), tuple(s.tags))
            if key in seen and not as_given:
                removed.append({"file": str(path), "row": s.row, "reason": "duplicate",
                                "detail": f"same words and tags as sentence {seen[key]}"})
                continue
            seen[key] = s.row
            kept.append(s)
        if not as_given and not any(entities(s.tags) for s in kept):
            raise DataError("no entities: every word is tagged O", path=path,
                            fix="check the tag column (the last column of a CoNLL file) or the spans")
        ex = Examples([s.text for s in kept], [tuple(s.tags) for s in kept], [s.row for s in kept], str(path),
                      {"tokens": [s.tokens for s in kept]})
        info = {"path": str(path), "format": detect_token_format(path, fmt), "sha256": file_sha256(path),
                "rows_read": len(sentences), "rows_kept": len(kept)}
        return ex, info, removed, repairs, long_texts

    def audit_sections(self, cfg, data, tokenizer, max_length: int) -> dict:
        from tuneforge.tasks.token_classification.audit import sections

        return sections(data, tokenizer, max_length, cfg.task.stride, cfg.audit)

    def load_tokenizer(self, model_dir: Path):
        from tuneforge.tasks.token_classification.predictor import load_word_tokenizer

        return load_word_tokenizer(model_dir)

    def label_space(self, cfg, data) -> LabelSet:
        return LabelSet.from_types(data.labels)

    def describe_space(self, space: LabelSet) -> str:
        return f"{len(space.types)} entity types ({', '.join(space.types)})"

    def encode(self, cfg, tokenizer, space: LabelSet, splits, max_length: int) -> tuple[dict, dict]:
        """Training windows (input ids and first-sub-word labels); validation and test as windows too, with
        their gold tags kept per sentence for scoring at the word level."""
        from tuneforge.tasks.token_classification.encoding import encode_windows

        ids, y = {}, {}
        for name, ex in splits.items():
            tokens = ex.extras["tokens"]
            if name == "train":
                windows = encode_windows(tokenizer, tokens, [list(t) for t in ex.labels], space, max_length,
                                         _stride(cfg, tokenizer, max_length))
                ids[name], y[name] = [w.input_ids for w in windows], [w.labels for w in windows]
            else:
                windows = encode_windows(tokenizer, tokens, None, space, max_length, _stride(cfg, tokenizer, max_length))
                ids[name], y[name] = [w.input_ids for w in windows], GoldSplit(tokens, [list(t) for t in ex.labels])
        return ids, y

    # --- model ---
    def load_model(self, model_dir: Path, space: LabelSet, seed: int, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForTokenClassification

        from tuneforge.errors import ModelNotFoundError
        from tuneforge.models.load import quiet_transformers

        torch.manual_seed(seed)
        with quiet_transformers():
            try:
                return AutoModelForTokenClassification.from_pretrained(
                    str(model_dir), num_labels=len(space.tags), id2label=space.id2label, label2id=space.label2id,
                    local_files_only=True, use_safetensors=True, dtype=torch.float32,
                    trust_remote_code=trust_remote_code)
            except (OSError, ValueError) as err:
                raise ModelNotFoundError(f"cannot load a token classifier from {model_dir} ({err})",
                                         fix="use a Hugging Face encoder directory with safetensors weights") from None

    def settings(self, cfg, max_length: int, space=None) -> dict:
        return {"task": self.name, "max_length": max_length, "stride": cfg.task.stride}

    # --- baselines ---
    def baselines(self, cfg, space, splits, ids, y, model, pad_id: int, precision: str) -> dict:
        from tuneforge.tasks.token_classification import baselines as bl

        train, test = _sentences(splits.train), _sentences(splits.test)
        make = {"majority": lambda: bl.majority(test), "gazetteer": lambda: bl.gazetteer(train, test),
                "crf": lambda: bl.crf(train, test, seed=cfg.train.seed)}
        return {name: make[name]() for name in cfg.eval.baselines}

    # --- validation inside the loop: entity F1 and the loss on each word's first sub-word ---
    def validator(self, cfg, space: LabelSet, tokenizer, max_length: int, val_ids, gold: GoldSplit, pad_id: int,
                  precision: str):
        from tuneforge.tasks.token_classification.metrics import f1_from_counts, sentence_counts
        from tuneforge.tasks.token_classification.predictor import TokenPredictor, tags_from_logits

        def validate(model) -> dict:
            model.eval()
            device = next(model.parameters()).device
            predictor = TokenPredictor(model, tokenizer, space, max_length, _stride(cfg, tokenizer, max_length), device, precision)
            logits = predictor.word_logits(gold.tokens, cfg.eval.batch_size)
            tags, _ = tags_from_logits(logits, space)
            return {"val_loss": _word_loss(logits, gold.tags, space),
                    f"val_{cfg.eval.metric}": f1_from_counts(sentence_counts(gold.tags, tags))}

        return validate

    # --- test evaluation of the exported model ---
    def export_outputs(self, predictor, test, batch_size: int) -> tuple[list, list]:
        """Each test sentence's word logits and its tags."""
        from tuneforge.tasks.token_classification.predictor import tags_from_logits

        logits = predictor.word_logits(test.extras["tokens"], batch_size)
        return logits, [list(t) for t in tags_from_logits(logits, predictor.labels)[0]]

    def load_predictor(self, model_dir: Path, device="cpu", precision: str = "fp32"):
        return EntityPredictor.load(model_dir, device, precision)

    def evaluate(self, cfg, space: LabelSet, splits, y: dict, predictor, baselines: dict) -> tuple[dict, tuple]:
        from tuneforge.tasks.token_classification.metrics import (bootstrap_f1_ci, entity_metrics, sentence_counts,
                                                                 type_confusion)
        from tuneforge.tasks.token_classification.predictor import tags_from_logits

        gold = y["test"].tags
        tags, scores = tags_from_logits(predictor.word_logits(y["test"].tokens, cfg.eval.batch_size), space)

        def scored(pred) -> dict:
            m = entity_metrics(gold, pred)
            m["ci"] = bootstrap_f1_ci(sentence_counts(gold, pred), cfg.eval.bootstrap_samples, seed=cfg.train.seed)
            return m

        result = {"main_metric": cfg.eval.metric, "labels": list(space.types),
                  "test": {"model": scored(tags), "baselines": {n: scored(p) for n, p in baselines.items()}},
                  "type_confusion": type_confusion(gold, tags)}
        return result, (tags, scores)

    def reference_profile(self, predictor, inputs: list[str], outputs: tuple) -> dict:
        """Entity types and confidence on the test split, as serving will log them."""
        from tuneforge.drift import logged_label, profile

        tags, scores = outputs
        observed = [_observed(t, s) for t, s in zip(tags, scores)]
        return profile([self.input_size(t) for t in inputs], [logged_label(kinds) for kinds, _ in observed],
                       [conf for _, conf in observed], list(predictor.labels.types) + [NO_ENTITY])

    # --- serving and predict ---
    def label_names(self, predictor) -> list[str]:
        return list(predictor.labels.types) + [NO_ENTITY]

    def observe(self, result: dict) -> tuple[list[str], float]:
        """Each entity's type (a text with none counts as "(none)"), and the mean entity score."""
        found = result["entities"]
        return [e["entity_group"] for e in found], (float(np.mean([e["score"] for e in found])) if found else 1.0)

    def prediction_table(self, texts: list[str], results: list[dict]) -> tuple[list[str], list[list[str]]]:
        rows = [["; ".join(f"{e['entity_group']}: {e['word']} [{e['start']}:{e['end']}] {e['score']:.2f}"
                           for e in r["entities"]) or "-"] for r in results]
        return ["entities (type: text [start:end] score)"], rows

    def report_details(self, metrics: dict) -> list[str]:
        from tuneforge.tasks.token_classification.report import report_details

        return report_details(metrics)

    def summary_rows(self, metrics: dict) -> tuple[list[str], list[list[str]]]:
        header = ["entity F1", "precision", "recall", "95% CI (F1)"]
        rows = []
        for name, m in [("fine-tuned model", metrics["test"]["model"])] + list(metrics["test"]["baselines"].items()):
            ci = m.get("ci")
            rows.append([name, f"{m['f1']:.4f}", f"{m['precision']:.4f}", f"{m['recall']:.4f}",
                         f"{ci['low']:.4f}-{ci['high']:.4f}" if ci else "-"])
        return header, rows

    def card_facts(self, data_report: dict, model_settings: dict) -> dict:
        facts = super().card_facts(data_report, model_settings)
        if "stride" in model_settings:
            facts["inputs"] = "Long inputs are split into overlapping windows at prediction, as in training."
        return facts

    def intended_use(self, metrics: dict) -> str:
        """The model card's intended-use paragraph."""
        return ("Finding entities of the types above in texts like those it was trained on (see the data summary). It is\n"
                "not meant for other languages, domains or label sets, nor for decisions about people without a\n"
                "human review: check the slice results and limitations first.")


def _stride(cfg, tokenizer, max_length: int) -> int:
    """task.stride, kept below half of a window's room for words."""
    from tuneforge.tasks.token_classification.encoding import special_layout

    before, after = special_layout(tokenizer)
    return min(cfg.task.stride, max(0, (max_length - len(before) - len(after)) // 2))


def _word_loss(logits: list[np.ndarray], gold: list[list[str]], space: LabelSet) -> float:
    """Mean cross-entropy of each word's logits against its gold tag (tags unseen in training left out)."""
    index = space.label2id
    rows = np.concatenate([l for l in logits if len(l)]) if logits else np.zeros((0, len(space.tags)))
    target = np.array([index.get(t, -1) for tags in gold for t in tags])
    keep = target >= 0
    if not keep.any():
        return 0.0
    z = rows[keep] - rows[keep].max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(keep.sum()), target[keep]].mean())


def _observed(tags: list[str], scores) -> tuple[list[str], float]:
    found = entities(tags)
    if not found:
        return [], 1.0
    return [k for k, _, _ in found], float(np.mean([np.mean(scores[s:e]) for _, s, e in found]))


class EntityPredictor:
    """The task's predictor: `predict(texts)` gives {"entities": [...]} per text (serving's and predict's
    shape); everything else is the token predictor's."""

    def __init__(self, inner):
        self._inner = inner

    @classmethod
    def load(cls, model_dir, device="cpu", precision="fp32") -> "EntityPredictor":
        from tuneforge.tasks.token_classification.predictor import TokenPredictor

        return cls(TokenPredictor.load(model_dir, device, precision))

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def predict(self, texts: list[str], batch_size: int = 32) -> list[dict]:
        return [{"entities": found} for found in self._inner.predict(texts, batch_size)]


TASK = TokenClassificationTask()
