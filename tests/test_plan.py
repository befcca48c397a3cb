"""Defaults that adapt to the data: epochs by size, early-stopping patience, max_length by token lengths."""
import json

import numpy as np

from tuneforge.config import TrainConfig
from tuneforge.models.infer import resolve_max_length
from tuneforge.training.loop import epochs_for, patience_for, plan_steps


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**kw)


def test_epochs_follow_the_data_size_within_bounds():
    cfg = _cfg()  # ~600 steps, at most 8 epochs, batch 32
    assert epochs_for(10_199, cfg) == 2     # 319 steps an epoch -> 2 epochs (638 steps)
    assert epochs_for(3_605, cfg) == 6      # 113 -> 6 (678)
    assert epochs_for(829, cfg) == 8        # 26 -> 24 wanted, capped at 8
    assert epochs_for(100_000, cfg) == 1    # never below one pass
    assert epochs_for(3_605, _cfg(epochs=1.5)) == 1.5  # an explicit value wins
    assert plan_steps(3_605, cfg)[1] == 6 * 113
    # the plan holds for any number of processes: they split each batch (tests/test_distributed.py)


def test_patience_is_two_epochs_of_evaluations_unless_set():
    cfg = _cfg()
    per_epoch, _, every = plan_steps(3_605, cfg)
    assert (per_epoch, every) == (113, 29)
    assert patience_for(cfg, per_epoch, every) == 8
    assert patience_for(cfg, 4, 1) == 8
    assert patience_for(cfg, 1, 1) == 3     # at least 3
    assert patience_for(_cfg(early_stopping_patience=0), per_epoch, every) == 0


class _Tok:
    def __init__(self, model_max_length):
        self.model_max_length = model_max_length


def test_max_length_fits_the_training_texts(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    lengths = np.array([20] * 97 + [70, 80, 500])
    assert resolve_max_length(None, lengths, _Tok(512), tmp_path) == (96, "fits 98% of training texts (cap 256)")
    assert resolve_max_length(None, np.array([5, 6, 7]), _Tok(512), tmp_path)[0] == 32      # never below 32
    assert resolve_max_length(None, np.array([900] * 10), _Tok(512), tmp_path)[0] == 256    # the cap
    assert resolve_max_length(None, np.array([900] * 10), _Tok(128), tmp_path)[0] == 128    # the tokenizer's limit
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    assert resolve_max_length(None, np.array([900] * 10), _Tok(10**30), tmp_path)[0] == 64  # the model's positions
    assert resolve_max_length(200, lengths, _Tok(512), tmp_path) == (200, "model.max_length")
