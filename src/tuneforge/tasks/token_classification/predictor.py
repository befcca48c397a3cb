"""Load an exported token-classification model directory and find the entities in texts.

A text is split into words (`readers.tokenize_words`: runs of word characters and single other marks), the words into
sub-word windows (`encoding.encode_windows`: long texts are windowed, never truncated), the windows run
through the model in length-grouped batches, each word read from its owning window's first sub-word,
tagged (argmax, BIO repaired) and grouped into entities. Each entity is a dict with the keys of
transformers' `pipeline("token-classification", aggregation_strategy="simple")`:
{"entity_group", "start", "end", "word", "score"} with `score` the mean of its words' probabilities.
Where every word is one sub-word, the result is the pipeline's (the tests check it); where words split,
this labels each word by its first sub-word as the pipeline's "first" strategy does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tuneforge.artifacts import SETTINGS_KEY  # max_length, stride in model/config.json
from tuneforge.errors import ModelNotFoundError
from tuneforge.models.device import resolve_device, resolve_precision
from tuneforge.models.infer import (INFER_PAD_MULTIPLE, autocast, collate, forward_cost, length_batches,
                                    pad_id_of)
from tuneforge.tasks.token_classification.encoding import (LabelSet, encode_windows, special_layout, stitch,
                                                           tags_from_logits)
from tuneforge.tasks.token_classification.readers import tokenize_words
from tuneforge.tasks.token_classification.sentence import entities

DEFAULT_MAX_LENGTH = 512
DEFAULT_STRIDE = 64


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The words of a text and their (start, end) spans: the readers' rule (`\\w+|[^\\w\\s]`), so a text is
    cut into the same words at prediction as its spans were at training."""
    found = tokenize_words(text)
    return [w for w, _, _ in found], [(a, b) for _, a, b in found]


def load_word_tokenizer(model_dir: Path):
    """The fast tokenizer, able to take pre-split words: byte-level BPE tokenizers (RoBERTa, GPT-2) need
    add_prefix_space for them. Training and prediction both load it this way."""
    from transformers import AutoTokenizer

    from tuneforge.models.load import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    try:
        tokenizer(["a"], is_split_into_words=True)
    except (AssertionError, ValueError):
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, add_prefix_space=True)
    if not tokenizer.is_fast:
        raise ModelNotFoundError(f"{model_dir} has no fast tokenizer (tokenizer.json)",
                                 fix="save the tokenizer with transformers' fast tokenizer (it writes tokenizer.json)")
    return tokenizer


def _length_limit(requested: int, tokenizer, config) -> int:
    """`requested`, capped by what the tokenizer and the model's position embeddings allow."""
    limits = [int(requested)]
    if 0 < (tokenizer.model_max_length or 0) < 1_000_000:
        limits.append(int(tokenizer.model_max_length))
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        limits.append(int(positions))
    return min(limits)


@dataclass
class TokenPredictor:
    model: object
    tokenizer: object
    labels: LabelSet
    max_length: int
    stride: int
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    @classmethod
    def load(cls, model_dir, device: str | torch.device = "cpu", precision: str = "fp32") -> "TokenPredictor":
        """`model_dir` holds config.json (with id2label) and model.safetensors. `max_length` and `stride`
        come from the config's `tuneforge` block (defaults 512 and 64), capped by the tokenizer's
        model_max_length and the model's position embeddings; the stride by half a window's room."""
        from transformers import AutoModelForTokenClassification

        from tuneforge.models.load import quiet_transformers

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
            raise ModelNotFoundError(f"{model_dir} is not a model directory (config.json + model.safetensors)",
                                     fix="pass the output directory of a finished token-classification run")
        with quiet_transformers():
            model = AutoModelForTokenClassification.from_pretrained(str(model_dir), local_files_only=True,
                                                                    use_safetensors=True)
            tokenizer = load_word_tokenizer(model_dir)
        cfg = model.config
        extra = getattr(cfg, SETTINGS_KEY, None) or {}
        labels = LabelSet.from_id2label(cfg.id2label)
        max_length = _length_limit(int(extra.get("max_length") or DEFAULT_MAX_LENGTH), tokenizer, cfg)
        before, after = special_layout(tokenizer)
        room = max(1, max_length - len(before) - len(after))
        stride = min(int(extra.get("stride", DEFAULT_STRIDE)), room // 2)
        device = resolve_device(device)
        precision, _ = resolve_precision(precision, device)
        model.to(device).eval()
        return cls(model, tokenizer, labels, max_length, stride, device, precision)

    @torch.no_grad()
    def word_logits(self, sentences: list[list[str]], batch_size: int = 32) -> list[np.ndarray]:
        """Per sentence, one row of logits per word (from the window owning it)."""
        windows = encode_windows(self.tokenizer, sentences, None, self.labels, self.max_length, self.stride)
        ids = [w.input_ids for w in windows]
        out: list[np.ndarray | None] = [None] * len(ids)
        pad = pad_id_of(self.tokenizer)
        for idx in length_batches([len(x) for x in ids], batch_size, call_cost=forward_cost(self.device)):
            batch = collate([ids[i] for i in idx], pad, self.device, INFER_PAD_MULTIPLE)
            with autocast(self.device, self.precision):
                logits = self.model(**batch).logits
            logits = logits.float().cpu().numpy()
            for row, i in enumerate(idx):
                out[i] = logits[row, : len(ids[i])]
        return stitch(windows, out, [len(s) for s in sentences])

    def predict(self, texts: list[str], batch_size: int = 32) -> list[list[dict]]:
        """For each text, its entities: {"entity_group", "start", "end", "word", "score"} (character offsets)."""
        split = [split_words(t) for t in texts]
        tags, scores = tags_from_logits(self.word_logits([w for w, _ in split], batch_size), self.labels)
        results = []
        for text, (_, spans), text_tags, text_scores in zip(texts, split, tags, scores):
            found = []
            for kind, first, last in entities(text_tags):
                start, end = spans[first][0], spans[last - 1][1]
                found.append({"entity_group": kind, "start": start, "end": end, "word": text[start:end],
                              "score": float(np.mean(text_scores[first:last]))})
            results.append(found)
        return results
