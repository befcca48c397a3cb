"""The cost estimate's parts that must hold whatever the machine: the check against the real steps, the block peak
memory, the training batches' padded widths, and scoring in logit-bounded batches."""
import numpy as np
import pytest
import torch

from tuneforge.training import cost
from tuneforge.training.loop import TRAIN_PAD_MULTIPLE, TrainData, padded_width, training_batch


def _est(per_token: float = 1e-3, steps_s: float = 100 * 0.032) -> dict:
    # a flat curve: each padded token 1 ms; a step of one 4x8 batch: 32 ms + 0 optimizer; 100 such steps
    return {"per_token_curve": [[8, per_token], [64, per_token]], "optimizer_seconds_per_step": 0.0,
            "seconds_so_far": 10.0, "seconds_train": steps_s, "seconds_validation": 5.0, "seconds_eval": 8.0,
            "seconds_export_and_report": 2.0, "seconds_total": 10.0 + steps_s + 8.0 + 2.0, "peak_memory_bytes": 1}


def test_steps_as_predicted_leave_the_estimate_alone():
    printed = []
    check = cost.EstimateCheck(_est(), total_steps=100, n_evals=4, print_fn=printed.append)
    for step in range(1, 60):
        check.step(step, 0.032 * (1.2 if step % 2 else 0.9), [(4, 8)])  # within 30% either way
    assert printed == [] and "corrected" not in check.est


def test_a_busy_warm_up_is_corrected_by_the_first_steps():
    """The warm-up measured 2.5x too slow (a busy moment): the real steps run at 0.4 of the prediction, so after the
    first check (step 8) the whole run is estimated again from them, once."""
    printed, est = [], _est(steps_s=100 * 0.032 * 2.5)
    check = cost.EstimateCheck(est, total_steps=100, n_evals=4, print_fn=printed.append)
    for step in range(1, 101):
        check.step(step, 0.032 * 0.4 if step > 1 else 1.0, [(4, 8)])  # the first step sets kernels up: slow
        if step % 25 == 0:
            check.evaluated(0.5)
    assert len(printed) == 1 and "corrected after step 8" in printed[0]
    c = est["corrected"]
    assert c["ratio"] == pytest.approx(0.4, rel=1e-6)
    # steps run so far (1 s + 7 x 12.8 ms) + the 92 left at 0.4 of the prediction; validation none measured yet
    assert c["seconds_train"] == pytest.approx(1.0 + 7 * 0.0128 + 8.0 * 0.92 * 0.4)
    assert c["seconds_total"] == pytest.approx(10.0 + c["seconds_train"] + 5.0 * 0.4 + 3.0 * 0.4 + 2.0)


def test_a_machine_that_gets_busy_later_is_corrected_again():
    printed, est = [], _est()
    check = cost.EstimateCheck(est, total_steps=100, n_evals=4, print_fn=printed.append)
    for step in range(1, 101):
        check.step(step, 0.032 * (1.0 if step <= 10 else 3.0), [(4, 8)])
    assert len(printed) == 1 and est["corrected"]["after_step"] == 25 and est["corrected"]["ratio"] == pytest.approx(3.0)


def test_validation_slower_than_estimated_is_corrected_though_the_steps_run_as_predicted():
    """The steps run as predicted, but each of the 4 validations takes 6 s, not the 1.25 s estimated: the projection
    at the next check (step 25, after the first validation at step 20) is off by more than 30%, so it is restated."""
    printed, est = [], _est()
    check = cost.EstimateCheck(est, total_steps=100, n_evals=4, print_fn=printed.append)
    for step in range(1, 101):
        check.step(step, 0.032, [(4, 8)])
        if step % 20 == 0:
            check.evaluated(6.0)
    assert len(printed) == 1 and "corrected after step 25 (validation takes 4.80x the time estimated)" in printed[0]
    c = est["corrected"]
    assert c["seconds_validation"] == pytest.approx(24.0) and c["seconds_train"] == pytest.approx(3.2)
    assert c["seconds_total"] == pytest.approx(10.0 + 3.2 + 24.0 + 3.0 + 2.0)


def test_peak_rss_sees_what_the_block_allocates():
    with cost.PeakRSS() as watch:
        before = cost._current_rss()
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        x += 1
        del x
    assert watch.peak - before >= 60 * 2**20


def test_training_batches_are_padded_to_the_multiple_with_masked_labels():
    data = TrainData([[5, 6, 7], [5, 6, 7, 8, 9]], [[1, 2, 3], [1, 2, 3, 4, 5]])
    batch = training_batch(data, np.array([0, 1]), pad_id=0, device="cpu")
    assert batch["input_ids"].shape == (2, TRAIN_PAD_MULTIPLE) == batch["labels"].shape
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] * (TRAIN_PAD_MULTIPLE - 5)
    assert batch["labels"][1].tolist() == [1, 2, 3, 4, 5] + [-100] * (TRAIN_PAD_MULTIPLE - 5)
    assert [padded_width(w) for w in (1, 8, 9, 64, 65)] == [8, 8, 16, 64, 72]


def test_padding_to_the_multiple_leaves_a_models_loss_as_it_was(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).eval()
    ids = [[2, 5, 6, 7, 3], [2, 8, 9, 3]]
    data = TrainData(ids, np.array([0, 1]))
    padded = training_batch(data, np.array([0, 1]), pad_id=0, device="cpu")
    tight = {"input_ids": padded["input_ids"][:, :5], "attention_mask": padded["attention_mask"][:, :5],
             "labels": padded["labels"]}
    with torch.no_grad():
        assert model(**padded).loss.item() == pytest.approx(model(**tight).loss.item(), abs=1e-6)


def test_scoring_in_logit_bounded_batches_gives_the_same_losses(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from tuneforge.tasks.causal_lm.encoding import Encoded
    from tuneforge.tasks.causal_lm.generate import example_losses, loss_batches

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    rng = np.random.default_rng(0)
    examples = []
    for n in rng.integers(6, 30, size=20).tolist():
        ids = rng.integers(3, 60, size=n).tolist()
        examples.append(Encoded(ids, [-100] * (n // 2) + ids[n // 2:], n // 2))
    vocab = model.get_output_embeddings().weight.shape[0]
    budget = 12 * vocab  # at most 12 labelled positions per forward
    batches = loss_batches(examples, 16, vocab, budget)
    kept = [sum(1 for lab in e.labels[1:] if lab != -100) for e in examples]
    assert sorted(i for b in batches for i in b.tolist()) == list(range(20))
    assert all(sum(kept[i] for i in b) <= 12 or len(b) == 1 for b in batches)
    assert len(batches) > len(loss_batches(examples, 16, vocab)) >= 2  # the budget cut batches the default keeps whole
    whole = example_losses(model, examples, pad_id=0, batch_size=16)
    import tuneforge.tasks.causal_lm.generate as generate

    saved, generate.LOGITS_BUDGET = generate.LOGITS_BUDGET, budget
    try:
        bounded = example_losses(model, examples, pad_id=0, batch_size=16)
    finally:
        generate.LOGITS_BUDGET = saved
    assert np.allclose(whole[0], bounded[0], atol=1e-4) and (whole[1] == bounded[1]).all()


def _flops(model, method: str) -> tuple[float, float]:
    """(counted FLOPs of one training forward + backward, of one forward alone) of a 16 x 24 batch."""
    from tuneforge.config import TrainConfig
    from tuneforge.models.load import apply_method
    from tuneforge.training.loop import default_collate, default_loss
    from torch.utils.flop_counter import FlopCounterMode

    model = apply_method(model, TrainConfig(method=method, frozen_layers=1), "SEQ_CLS")
    rng = np.random.default_rng(0)
    data = TrainData([list(rng.integers(5, 300, 24)) for _ in range(16)], np.arange(16) % 2)
    idx = np.arange(16)
    total = cost.counted_flops(model, data, idx, 0, torch.device("cpu"), "fp32", default_loss, default_collate)
    batch = training_batch(data, idx, 0, torch.device("cpu"), default_collate)
    with FlopCounterMode(display=False, custom_mapping=cost._cpu_attention_flops()) as forward, torch.no_grad():
        default_loss(model, batch)
    # the forward alone, as the DPO bench counts its reference model: the same count as the counter's own
    model.zero_grad(set_to_none=True)
    assert cost.counted_flops(model, data, idx, 0, torch.device("cpu"), "fp32", default_loss, default_collate,
                              backward=False) == forward.get_total_flops()
    assert all(p.grad is None for p in model.parameters())  # no backward ran
    return total, float(forward.get_total_flops())


def test_counted_flops_follow_what_each_method_computes(tiny_model_dir):
    """A full fine-tune's backward computes input and weight gradients: ~3x the forward's FLOPs; LoRA's computes the
    input gradients only (the base weights are frozen): ~2x; freezing the lower of the 2 layers takes its backward
    away: ~1 + 2 x (the upper layer's share of the forward) = ~2x."""
    from transformers import AutoModelForSequenceClassification

    runs = {}
    for method in ("full", "lora", "frozen"):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
        runs[method] = _flops(model, method)
    full, lora, frozen = (runs[m][0] / runs[m][1] for m in ("full", "lora", "frozen"))
    assert 2.8 < full < 3.3, full  # attention's backward is 2.5x its forward (flash), the matmuls' 2x
    assert 1.9 < lora < 2.5, lora
    assert 1.6 < frozen < 2.4 and frozen < full


def test_a_run_reports_its_flops_per_second_beside_the_measured_peak(base_config, write_csv, tmp_path, capsys):
    import json

    from tuneforge.config import parse_config
    from tuneforge.pipeline import run

    from conftest import make_rows

    run(parse_config(base_config(write_csv(make_rows(80)), train={"method": "full", "epochs": 1})))
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    u, actual = info["utilisation"], json.loads((tmp_path / "out" / "metrics.json").read_text())["cost"]["actual"]
    assert u["flops_per_token"] > 0 and u["peak_flops_per_second"] > 1e9 and u["precision"] == info["precision"]
    assert u["achieved_flops_per_second"] == pytest.approx(u["flops_per_token"] * actual["train_tokens_per_second"],
                                                           rel=1e-6)
    assert u["share_of_peak"] == pytest.approx(u["achieved_flops_per_second"] / u["peak_flops_per_second"])
    shown = capsys.readouterr().out
    assert f"GFLOP/s = {u['share_of_peak']:.0%} of this CPU's {info['precision']} matmul peak" in shown
    assert f"{actual['train_tokens_per_second']:.0f} tokens/s, " in shown  # the task's positions: a text's tokens


def test_attention_on_the_cpu_counts_its_flops():
    """torch's counter knows the GPU attention kernels only; on the CPU SDPA's forward is 4 x B x H x L x L x D (QK^T
    and the weighted sum of V)."""
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (torch.randn(2, 4, 64, 16) for _ in range(3))
    with FlopCounterMode(display=False) as plain, torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with FlopCounterMode(display=False, custom_mapping=cost._cpu_attention_flops()) as counted, torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert plain.get_total_flops() == 0  # if torch learns the CPU kernel, the mapping can go
    assert counted.get_total_flops() == 4 * 2 * 4 * 64 * 64 * 16
