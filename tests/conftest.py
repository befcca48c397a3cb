"""Tiny random models and small data sets, built in seconds inside the tests. Nothing is downloaded."""
from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

POSITIVE = "good great superb lovely moving brilliant fun charming".split()
NEGATIVE = "bad awful dull boring weak clumsy tedious flat".split()
FILLER = "the film movie plot actor story scenes was is a and very quite".split()


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Review-like rows whose label follows its sentiment words; `topic` is a column that is not an input."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2) + rng.sample(FILLER, rng.randint(2, 6))
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {i}", "label": label, "topic": rng.choice(["a", "b"])})
    return rows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer BERT (hidden 32) with a word-level tokenizer, saved as a Hugging Face directory."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    import torch

    path = tmp_path_factory.mktemp("tiny-bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted(set(POSITIVE + NEGATIVE + FILLER)) + [str(i) for i in range(300)]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def write_csv(tmp_path):
    def write(rows: list[dict], name: str = "data.csv"):
        import pandas as pd

        path = tmp_path / name
        pd.DataFrame(rows).to_csv(path, index=False)
        return path

    return write


@pytest.fixture
def base_config(tiny_model_dir, tmp_path):
    """A fast run config on the tiny model; tests fill in data.path."""
    def make(data_path, **sections) -> dict:
        raw = {
            "data": {"path": str(data_path), "val_fraction": 0.2, "test_fraction": 0.2},
            "model": {"name": str(tiny_model_dir), "max_length": 32},
            "train": {"epochs": 3, "batch_size": 8, "learning_rate": 5e-3, "eval_every": 2,
                      "early_stopping_patience": 0},
            "eval": {"bootstrap_samples": 50, "batch_size": 16},
            "output": {"dir": str(tmp_path / "out")},
        }
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return raw

    return make
