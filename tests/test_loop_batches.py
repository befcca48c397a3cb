"""The training loop makes no assumption about the targets' shape: each task collates its own batches.

The three tasks' batches are exactly those the loop built before it handed batching to the task (the loop's old
`training_batch` is kept below as the reference), and a task whose targets have a length of their own (an
encoder-decoder's labels) trains through `loop.train` and the cost estimate unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tuneforge.models.infer import collate
from tuneforge.tasks.behaviour import get_task
from tuneforge.tasks.base import TaskDefaults
from tuneforge.training.loop import TRAIN_PAD_MULTIPLE, TrainData, padded_width, training_batch


def old_training_batch(data: TrainData, idx, pad_id: int, device) -> dict:
    """The loop's batches before the task collated them (tuneforge 17c072e, training/loop.py), verbatim."""
    batch = collate([data.ids[i] for i in idx], pad_id, device, multiple=TRAIN_PAD_MULTIPLE)
    if data.positions is not None:
        width = batch["input_ids"].shape[1]
        positions = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(data.positions[i])
            positions[r, :n] = torch.as_tensor(data.positions[i], dtype=torch.long)
            positions[r, n:] = torch.arange(width - n)
        del batch["attention_mask"]
        batch["position_ids"] = positions.to(device)
        batch["use_cache"] = False
    if isinstance(data.targets, np.ndarray):
        batch["labels"] = torch.from_numpy(data.targets[idx]).to(device)
    else:
        labels = torch.full(batch["input_ids"].shape, -100, dtype=torch.long)
        for r, i in enumerate(idx):
            labels[r, : len(data.targets[i])] = torch.as_tensor(data.targets[i], dtype=torch.long)
        batch["labels"] = labels.to(device)
    return batch


def assert_same_batches(task_name: str, data: TrainData, pad_id: int) -> None:
    """Every batch a run could draw (several orders, sizes and widths) is the old one: same keys, values, dtypes."""
    task = get_task(task_name)
    n = len(data.ids)
    rng = np.random.default_rng(0)
    draws = [np.arange(n), np.arange(n)[::-1].copy(), rng.permutation(n)[: max(1, n // 2)], np.array([n - 1]),
             list(range(min(3, n)))]
    for idx in draws:
        old = old_training_batch(data, idx, pad_id, torch.device("cpu"))
        new = training_batch(data, idx, pad_id, torch.device("cpu"), task.collate)
        assert set(new) == set(old), (task_name, idx)
        for key, value in old.items():
            if isinstance(value, torch.Tensor):
                assert new[key].dtype == value.dtype and torch.equal(new[key], value), (task_name, key, idx)
            else:
                assert new[key] == value, (task_name, key)


def _ids(rng, lengths) -> list[list[int]]:
    return [rng.integers(5, 90, size=int(k)).tolist() for k in lengths]


def test_classification_batches_are_unchanged(tiny_model_dir):
    from tuneforge.models.infer import encode
    from tuneforge.models.load import load_tokenizer
    from tuneforge.tasks.classification.labels import LabelSpace

    tok = load_tokenizer(tiny_model_dir)
    texts = ["good film", "the plot was very dull and boring and flat", "a lovely moving story", "bad",
             "the actor was quite brilliant and fun and charming in the scenes of the movie"]
    ids = encode(tok, texts, 64)
    assert len({padded_width(len(x)) for x in ids}) > 1  # the widths cross the padding multiple
    single = LabelSpace(("neg", "pos", "meh"), False, 0.5).encode(["pos", "neg", "pos", "neg", "meh"])
    multi = LabelSpace(("a", "b", "c"), True, 0.5).encode([["a"], ["a", "c"], [], ["b"], ["a", "b", "c"]])
    assert single.dtype == np.int64 and multi.dtype == np.float32
    for targets in (single, multi):
        assert_same_batches("text-classification", TrainData(ids, targets), tok.pad_token_id)


def test_token_classification_batches_are_unchanged(tiny_model_dir):
    from tuneforge.models.load import load_tokenizer
    from tuneforge.tasks.token_classification.encoding import LabelSet, encode_windows

    tok = load_tokenizer(tiny_model_dir)
    sentences = [["good", "film"], ["the", "plot", "was", "dull"], ["a", "story"] * 8, ["bad"],
                 ["the", "actor", "was", "brilliant", "and", "the", "movie", "fun"]]
    tags = [["B-PER", "O"], ["O", "B-LOC", "I-LOC", "O"], ["O", "B-PER"] * 8, ["O"],
            ["O", "B-PER", "O", "O", "O", "O", "B-LOC", "O"]]
    windows = encode_windows(tok, sentences, tags, LabelSet.from_types(["LOC", "PER"]), 12, 2)
    assert len(windows) > len(sentences)  # the long sentence runs over several windows
    data = TrainData([w.input_ids for w in windows], [w.labels for w in windows])
    assert_same_batches("token-classification", data, tok.pad_token_id)


def test_causal_lm_batches_are_unchanged():
    from tuneforge.tasks.causal_lm.encoding import IGNORE, Encoded, pack

    rng = np.random.default_rng(1)
    examples = []
    for n in (11, 27, 12, 10, 9, 5, 3):
        ids = rng.integers(3, 60, size=n).tolist()
        examples.append(Encoded(ids, [IGNORE] * (n // 3) + ids[n // 3:], n // 3))
    for packing in (True, False):  # packed rows, and one example a row (positions 0..n-1)
        rows, labels, positions = pack(examples, 32, packing)
        assert_same_batches("causal-lm", TrainData(rows, labels, positions), 2)
    rows, labels, _ = pack(examples, 32, False)
    assert_same_batches("causal-lm", TrainData(rows, labels), 2)  # no positions: an attention mask, as before


def test_the_default_collate_refuses_what_it_does_not_know():
    """A row with more than input ids and labels (packed positions, pixel values) needs the task's own collate:
    silently dropping it would train on something else."""
    with pytest.raises(TypeError, match="position_ids"):
        TaskDefaults().collate([{"input_ids": [1, 2], "labels": [1, 2], "position_ids": [0, 1]}], 0, 8)


# ------------------------------------------------------------------ a target of its own length

PAD = 0


class Seq2SeqTask(TaskDefaults):
    """What an encoder-decoder task adds: labels padded on their own (with -100), decoder inputs shifted from them."""

    def collate(self, examples: list[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict:
        batch = collate([e["input_ids"] for e in examples], pad_id, multiple=pad_to_multiple_of)
        width = max(len(e["labels"]) for e in examples)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        for r, e in enumerate(examples):
            labels[r, : len(e["labels"])] = torch.as_tensor(e["labels"], dtype=torch.long)
        decoder = torch.full_like(labels, pad_id)  # T5 starts decoding from the pad id
        decoder[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad_id)
        return {**batch, "labels": labels, "decoder_input_ids": decoder}


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
                      decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=1, dropout_rate=0.0)
    return T5ForConditionalGeneration(config)


def _seq2seq_data(n: int = 12) -> TrainData:
    """Inputs of 3-13 tokens; labels of 2-20, unrelated to their input's length."""
    rng = np.random.default_rng(0)
    ids = _ids(rng, rng.integers(3, 14, size=n))
    labels = _ids(rng, rng.integers(2, 21, size=n))
    return TrainData(ids, labels)


def test_an_encoder_decoder_target_of_its_own_length_trains_through_the_loop(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from tuneforge.config import EvalConfig, TrainConfig
    from tuneforge.training import cost
    from tuneforge.training.loop import make_batches, train

    task, data, model = Seq2SeqTask(), _seq2seq_data(), _tiny_t5()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    est = cost.estimate(model, data.ids, data.targets, batch_size=4, seed=0, group_by_length=True, total_steps=2,
                        grad_accum=1, eval_rows_tokens=40, n_evals=1, infer_tokens=40, pad_id=PAD, precision="fp32",
                        collate=task.collate)  # the warm-up batches through the task too
    assert est["seconds_total"] > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the estimate trains nothing

    seen, losses, shapes = [], [], []

    def loss_fn(model, batch):
        seen.append((tuple(batch["input_ids"].shape), tuple(batch["labels"].shape)))
        loss = model(**batch).loss
        losses.append(float(loss.detach()))
        return loss

    class Monitor:
        def step(self, step, seconds, step_shapes):
            shapes.extend(step_shapes)

        def evaluated(self, seconds):
            pass

    val = Seq2SeqTask().collate(data.examples(range(4)), PAD, TRAIN_PAD_MULTIPLE)

    def validate(m) -> dict:
        with torch.no_grad():
            return {"val_loss": float(m(**val).loss)}

    AcceleratorState._reset_state(reset_partial_state=False)  # as pipeline.make_accelerator: a fresh precision state
    cfg = TrainConfig(method="full", learning_rate=1e-2, batch_size=4, max_steps=2, epochs=1, warmup_ratio=0.0,
                      seed=0, precision="fp32")
    result = train(model, data, validate, cfg, EvalConfig(), accelerator=Accelerator(cpu=True), precision="fp32",
                   pad_id=PAD, checkpoint_dir=tmp_path / "ckpt", resume=False, loss_fn=loss_fn,
                   select=("val_loss", "min"), monitor=Monitor(), collate=task.collate)

    assert result.steps == 2 and len(losses) == 2 and all(np.isfinite(losses))
    assert any(inputs[1] != labels[1] for inputs, labels in seen)  # the labels kept their own length
    assert all(inputs[0] == labels[0] for inputs, labels in seen)
    assert [s for s, _ in seen] == shapes  # the estimate check saw each batch's (rows, padded width)
    assert all(width % TRAIN_PAD_MULTIPLE == 0 for _, width in shapes)
    lengths = [len(x) for x in data.ids]
    drawn = make_batches(lengths, cfg.batch_size, cfg.seed, 0, cfg.group_by_length)[:2]
    assert result.samples == 8 and result.tokens == sum(lengths[i] for b in drawn for i in b)  # input tokens
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("decoder" in k for k in changed) and any("encoder" in k for k in changed)
