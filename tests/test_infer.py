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


def test_holding_the_weights_autocast_casts_changes_no_output_and_leaves_norms_and_embeddings_fp32():
    """Serving casts Linear and conv weights to bf16 once (hold_autocast_weights) instead of autocast casting them at
    every forward: under autocast the outputs must be bit-identical, and what autocast keeps fp32 must stay fp32."""
    import copy

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from tuneforge.models.infer import hold_autocast_weights

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3)).eval()
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 6 * 6, 4)).eval()
    inputs = [{"input_ids": torch.randint(0, 50, (4, 9))}, torch.randn(2, 3, 8, 8)]
    for model, x in zip((bert, conv), inputs):
        held = copy.deepcopy(model)
        assert hold_autocast_weights(held, "fp32") == 0
        n = hold_autocast_weights(held, "bf16")
        assert n == sum(2 if getattr(m, "bias", None) is not None else 1 for m in held.modules()
                        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            want = model(**x).logits if isinstance(x, dict) else model(x)
            got = held(**x).logits if isinstance(x, dict) else held(x)
        assert torch.equal(got, want)
        for module in held.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.Embedding, torch.nn.BatchNorm2d)):
                assert all(p.dtype == torch.float32 for p in module.parameters(recurse=False))
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                assert module.weight.dtype == torch.bfloat16
