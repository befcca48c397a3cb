"""Inference batching: rows cut into batches by length, answers back in input order."""
from __future__ import annotations

import numpy as np
import torch

from tuneforge.models.infer import FORWARD_COST_TOKENS, collate, length_batches, predict_logits


def _padded_cost(lengths, batches, multiple=8, call_cost=FORWARD_COST_TOKENS):
    return sum(len(b) * -(-max(lengths[i] for i in b) // multiple) * multiple + call_cost for b in batches)


def test_length_batches_cover_every_row_once_within_the_batch_limit():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 120, size=301).tolist()
    batches = length_batches(lengths, max_batch=16)
    assert sorted(np.concatenate(batches).tolist()) == list(range(301))
    assert max(len(b) for b in batches) <= 16


def test_length_batches_pad_less_than_one_batch_per_arrival_group():
    rng = np.random.default_rng(1)
    lengths = rng.integers(8, 64, size=16).tolist()
    batches = length_batches(lengths, max_batch=64)
    assert len(batches) > 1  # mixed lengths: cutting pays for the extra forward call
    assert _padded_cost(lengths, batches) < _padded_cost(lengths, [np.arange(16)])


def test_length_batches_keep_similar_lengths_together():
    # two clear groups: short ones and long ones, never mixed
    lengths = [10] * 20 + [100] * 20
    batches = length_batches(lengths, max_batch=64)
    assert [sorted(set(lengths[i] for i in b)) for b in batches] == [[10], [100]]
    # equal lengths: one call beats several
    assert len(length_batches([12] * 30, max_batch=64)) == 1


def test_predict_logits_in_input_order_and_equal_to_one_row_at_a_time(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3).eval()
    rng = np.random.default_rng(2)
    ids = [[2] + rng.integers(5, 40, size=n).tolist() + [3] for n in rng.integers(1, 50, size=23)]
    batched = predict_logits(model, ids, pad_id=0, batch_size=8)
    with torch.no_grad():
        single = np.concatenate([model(**collate([x], 0)).logits.numpy() for x in ids])
    np.testing.assert_allclose(batched, single, atol=1e-5)
