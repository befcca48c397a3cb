"""Preference tuning (DPO) of the causal LM on the tiny Llama: the packed loss against a DPO loss computed by hand
from each answer run alone, the reference without a second model (LoRA: the adapters off), exact loss scaling under
accumulation and over two processes, the data formats and their errors, and one run end to end."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from test_causal_lm_pipeline import ANSWERS, topic_prompt


def preference_rows(n: int = 120, seed: int = 0) -> list[dict]:
    """A topic prompt; chosen: its topic's answer; rejected: another topic's."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt, good = topic_prompt(rng, i)
        bad = ANSWERS[rng.choice(sorted(t for t in ANSWERS if ANSWERS[t] != good))]
        rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(data, model_dir, out, **sections):
    from tuneforge.config import parse_config

    train = {"method": "full", "epochs": 3, "learning_rate": 1e-2, "early_stopping_patience": 0, "batch_size": 2}
    return parse_config({"task": {"type": "causal-lm", "beta": 0.5, **sections.pop("task", {})},
                         "data": {"path": str(data), "val_fraction": 0.15, "test_fraction": 0.2},
                         "model": {"name": str(model_dir), "max_length": 32},
                         "train": train | sections.pop("train", {}),
                         "eval": {"bootstrap_samples": 50} | sections.pop("eval", {}),
                         "output": {"dir": str(out)}})


@pytest.fixture(scope="module")
def prepared(tiny_llama_dir, tmp_path_factory):
    """The pipeline's prepare on 120 pairs: tokenizer, encoded pairs, packed training rows."""
    from rich.console import Console

    from tuneforge.pipeline import prepare

    d = tmp_path_factory.mktemp("pairs")
    cfg = _config(_write_jsonl(d / "pairs.jsonl", preference_rows()), tiny_llama_dir, d / "out")
    return prepare(cfg, Console(quiet=True))


def _hand_logp(model, ids: list[int], prompt_len: int) -> tuple[float, int]:
    """log p(answer | prompt) of one sequence alone: log-softmax of the plain forward, summed over the answer."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)
    total = sum(float(logprobs[t - 1, ids[t]]) for t in range(prompt_len, len(ids)))
    return total, len(ids) - prompt_len


def _hand_loss(model, pairs, reference, beta, kind, sft_weight=0.0) -> float:
    losses = []
    for p, (ref_c, ref_r) in zip(pairs, reference):
        (lc, nc), (lr, nr) = _hand_logp(model, p.chosen.ids, p.chosen.prompt_len), _hand_logp(model, p.rejected.ids, p.rejected.prompt_len)
        if kind == "sigmoid":
            loss = -math.log(1 / (1 + math.exp(-beta * ((lc - ref_c) - (lr - ref_r)))))
        elif kind == "sigmoid_norm":
            loss = -math.log(1 / (1 + math.exp(-beta * ((lc - ref_c) / nc - (lr - ref_r) / nr))))
        else:  # ipo
            loss = ((lc - ref_c) / nc - (lr - ref_r) / nr - 1 / (2 * beta)) ** 2
        losses.append(loss + sft_weight * (-lc / nc))
    return float(np.mean(losses))


@pytest.mark.parametrize("kind,sft_weight", [("sigmoid", 0.0), ("sigmoid_norm", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)])
def test_packed_loss_equals_dpo_by_hand(prepared, kind, sft_weight):
    """Several pairs packed per row, chosen and rejected in one forward: the loss equals DPO computed by hand from
    each answer run alone (fp32), for each loss variant and with the SFT term."""
    from tuneforge.tasks.causal_lm.model import load_causal_lm
    from tuneforge.tasks.causal_lm.preference import pack_pairs, preference_loss
    from tuneforge.tasks.causal_lm.task import TASK

    model = load_causal_lm(prepared.model_dir).eval()
    pairs = prepared.y["train"].pairs[:7]
    ids, rows = pack_pairs(pairs, 128)
    assert len(rows) < len(pairs) and max(rows.units) >= 3  # really packed
    rng = np.random.default_rng(0)
    reference = -rng.uniform(5, 20, size=(len(pairs), 2))  # any reference: the loss is not at its starting value
    rows.set_reference(reference)
    order = [k for r in rows for k in r["pairs"]]
    examples = [{"input_ids": ids[i], "labels": rows[i], "position_ids": rows.positions[i]} for i in range(len(rows))]
    batch = TASK.collate(examples, 0, 8)
    got = preference_loss(0.3, kind, sft_weight)(model, batch)
    want = _hand_loss(model, [pairs[k] for k in order], reference[order], 0.3, kind, sft_weight)
    assert float(got.detach()) == pytest.approx(want, rel=1e-5, abs=1e-6)


def _batch(prepared, rows_idx, ids, rows):
    from tuneforge.tasks.causal_lm.task import TASK

    return TASK.collate([{"input_ids": ids[i], "labels": rows[i], "position_ids": rows.positions[i]} for i in rows_idx], 0, 8)


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_accumulation_weighs_each_pair_alike(prepared):
    """Batches holding different numbers of pairs (packed rows): the accumulated gradient, each batch's mean loss
    weighted by its share of the step's pairs (the loop's step_weights), equals the gradient of one batch of them all;
    dividing each batch's mean by grad_accum does not."""
    from tuneforge.tasks.causal_lm.model import load_causal_lm
    from tuneforge.tasks.causal_lm.preference import pack_pairs, preference_loss
    from tuneforge.training.loop import loss_units, step_weights

    model = load_causal_lm(prepared.model_dir)
    model.eval()  # no dropout: the same forward each time
    pairs = prepared.y["train"].pairs[:9]
    ids, rows = pack_pairs(pairs, 96)
    rows.set_reference(-np.random.default_rng(1).uniform(5, 20, size=(len(pairs), 2)))
    units = loss_units(rows)
    group = [np.array([0]), np.arange(1, len(rows))]
    assert units[group[0]].sum() != units[group[1]].sum()  # unequal batches: the case plain division gets wrong
    loss = preference_loss(0.5, "sigmoid", 0.0)

    model.zero_grad()
    loss(model, _batch(prepared, np.concatenate(group), ids, rows)).backward()
    whole = _grads(model)
    model.zero_grad()
    for mine, weight in step_weights(group, units, 0, 1):
        (loss(model, _batch(prepared, mine, ids, rows)) * weight).backward()
    torch.testing.assert_close(_grads(model), whole, rtol=1e-4, atol=1e-7)
    model.zero_grad()
    for idx in group:
        (loss(model, _batch(prepared, idx, ids, rows)) / len(group)).backward()
    assert not torch.allclose(_grads(model), whole, rtol=1e-3, atol=1e-6)


def test_lora_reference_is_the_model_with_its_adapters_off_and_no_second_copy(prepared, monkeypatch, tmp_path):
    """Under LoRA the reference log-probs equal the trained model's with its adapters disabled, and while training
    only one model is alive (the SFT baseline's was freed; no reference copy)."""
    import copy
    import gc

    from transformers import PreTrainedModel

    from tuneforge.pipeline import fit, make_accelerator
    from tuneforge.tasks.causal_lm.preference import pair_logps
    from tuneforge.tasks.causal_lm.task import CausalLMTask

    cfg = prepared.cfg.model_copy(deep=True)
    cfg.train.method, cfg.train.precision, cfg.train.epochs, cfg.train.learning_rate = "lora", "fp32", 1, 1e-2
    cfg.output.dir = str(tmp_path / "out")
    prep = type(prepared)(**{**prepared.__dict__, "cfg": cfg, "baselines": None, "durations": {}})
    prep.y = copy.deepcopy(prepared.y)  # its reference is computed here, in fp32
    alive = []
    original = CausalLMTask.training_loss

    def counting(self, cfg):
        inner = original(self, cfg)

        def loss(model, batch):
            if "reference" in batch and not alive:
                gc.collect()
                alive.append(sum(isinstance(o, PreTrainedModel) and type(o).__name__.endswith("ForCausalLM")
                                 for o in gc.get_objects()))
            return inner(model, batch)

        return loss

    monkeypatch.setattr(CausalLMTask, "training_loss", counting)
    accelerator, precision, why = make_accelerator(cfg)
    fitted = fit(prep, cfg, accelerator, precision, why, out=tmp_path / "out")
    assert alive == [1]
    assert "sft_chosen" in prep.baselines  # the SFT baseline was trained first, and freed
    train = prep.y["train"]
    model = fitted.model
    with model.disable_adapter():
        off = pair_logps(model, train.pairs, prep.tokenizer.pad_token_id, 16, "fp32")[0]
    on = pair_logps(model, train.pairs, prep.tokenizer.pad_token_id, 16, "fp32")[0]
    np.testing.assert_allclose(off, train.reference, rtol=1e-5, atol=1e-4)
    assert np.abs(on - train.reference).max() > 0.1  # the adapters did learn


def test_two_processes_with_accumulation_follow_one(tmp_path, tiny_llama_dir):
    """DDP (`--nproc 2`) and accumulation over packed rows of unequal pair counts: each process's mean loss weighted by
    its share of the step's pairs, so two processes follow one."""
    import yaml
    from test_distributed import _cli, _one_process, _results

    data = _write_jsonl(tmp_path / "pairs.jsonl", preference_rows(80))
    for name in ("one", "two"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": {"type": "causal-lm", "beta": 0.5}, "model": {"name": str(tiny_llama_dir), "max_length": 32},
            "data": {"path": str(data), "val_fraction": 0.15, "test_fraction": 0.15},
            "train": {"method": "full", "epochs": 1, "batch_size": 3, "grad_accum": 2, "learning_rate": 3e-3,
                      "precision": "fp32", "early_stopping_patience": 0},
            "eval": {"bootstrap_samples": 20, "baselines": ["reference", "length"]},
            "output": {"dir": str(tmp_path / name)}}))
    _one_process(tmp_path / "one.yaml")
    proc = _cli(["run", str(tmp_path / "two.yaml"), "--nproc", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (m1, r1), (m2, r2) = _results(tmp_path / "one"), _results(tmp_path / "two")
    assert r2["distributed"]["processes"] == 2 and r1["steps"] == r2["steps"] > 2
    h1, h2 = m1["validation"]["history"], m2["validation"]["history"]
    for key in ("train_loss", "val_loss", "val_reward_margin"):
        np.testing.assert_allclose([h[key] for h in h2], [h[key] for h in h1], atol=1e-4)
    assert m2["test"]["model"]["preference_accuracy"] == pytest.approx(m1["test"]["model"]["preference_accuracy"])


def _read(tmp_path, rows, name="p.jsonl", **task):
    from tuneforge.config import parse_config
    from tuneforge.tasks.causal_lm.data import read_conversations

    path = _write_jsonl(tmp_path / name, rows)
    cfg = parse_config({"task": {"type": "causal-lm", **task}, "data": {"path": str(path)}, "model": {"name": "x"},
                        "output": {"dir": str(tmp_path / "o")}})
    return read_conversations(path, cfg.task, "text", None, "utf-8")


def test_formats_give_the_same_pair(tmp_path):
    """Strings with a prompt, message lists with the prompt as their shared turns, an explicit message prompt with one
    assistant message each side, and strings sharing their leading words: one prompt turn, chosen, rejected."""
    user = [{"role": "user", "content": "tell me about cats"}]
    good, bad = {"role": "assistant", "content": "cats fur"}, {"role": "assistant", "content": "dogs bark"}
    forms = [{"prompt": "tell me about cats", "chosen": "cats fur", "rejected": "dogs bark"},
             {"chosen": user + [good], "rejected": user + [bad]},
             {"prompt": user, "chosen": [good], "rejected": [bad]},
             {"chosen": "tell me about cats cats fur", "rejected": "tell me about cats dogs bark"}]
    for k, row in enumerate(forms):
        (conv,), kind = _read(tmp_path, [row], f"f{k}.jsonl")
        assert kind == "preference"
        assert (conv.messages, conv.rejected) == (user + [good], "dogs bark"), row
    (conv,), _ = _read(tmp_path, [{"q": "tell me", "good": "cats fur", "bad": "dogs bark"}], "named.jsonl",
                       prompt_column="q", chosen_column="good", rejected_column="bad")
    assert conv.messages[-1]["content"] == "cats fur" and conv.rejected == "dogs bark"


@pytest.mark.parametrize("row,field,words", [
    ({"prompt": "tell me", "chosen": "cats fur", "rejected": " cats fur "}, "rejected", "same answer"),
    ({"prompt": "tell me", "chosen": "cats fur", "rejected": ""}, "rejected", "is empty"),
    ({"prompt": "tell me", "chosen": "cats fur"}, "rejected", "rejected is missing"),
    ({"chosen": "cats fur", "rejected": "dogs bark"}, "prompt", "share no leading words"),
    ({"prompt": "tell me", "chosen": [{"role": "assistant", "content": "cats"}], "rejected": "dogs"}, "rejected",
     "a list of messages but rejected is a string"),
    ({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"},
                 {"role": "assistant", "content": "c"}],
      "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "chosen",
     "one assistant message"),
])
def test_bad_pairs_name_file_row_and_field(tmp_path, row, field, words):
    from tuneforge.errors import DataError

    rows = preference_rows(3) + [row]
    with pytest.raises(DataError) as err:
        _read(tmp_path, rows)
    text = str(err.value)
    assert words in text and "p.jsonl" in text and err.value.column.startswith(field)
    assert err.value.row == 3


def test_a_file_without_the_rejected_column_names_it(tmp_path):
    from tuneforge.errors import DataError

    with pytest.raises(DataError) as err:
        _read(tmp_path, [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in preference_rows(3)])
    assert "'rejected' not found beside 'chosen'" in str(err.value) and err.value.column == "rejected"


def test_a_prompt_with_no_room_for_the_answers_exits_2(tmp_path, tiny_llama_dir, capsys):
    from tuneforge.cli import main

    rows = preference_rows(40) + [{"prompt": " ".join(["cats"] * 40), "chosen": "cats fur", "rejected": "dogs bark"}]
    import yaml

    data = _write_jsonl(tmp_path / "long.jsonl", rows)
    (tmp_path / "long.yaml").write_text(yaml.safe_dump({
        "task": {"type": "causal-lm"}, "data": {"path": str(data)}, "model": {"name": str(tiny_llama_dir), "max_length": 24},
        "train": {"epochs": 1}, "output": {"dir": str(tmp_path / "o")}}))
    code = main(["run", str(tmp_path / "long.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "long.jsonl" in err and "leaves no room for the answers" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "model").exists()


def test_audit_flags_length_bias_and_near_identical_pairs(tmp_path, tiny_llama_dir):
    from tuneforge.pipeline import audit_only
    from tuneforge.runlog import make_console

    rows = preference_rows(60)
    for k, r in enumerate(rows):  # the chosen answer is the longer in every pair; every fifth pair nearly the same
        r["chosen"] = r["chosen"] + " and the sun is hot"
        if k % 5 == 0:
            r["rejected"] = r["chosen"] + " wet"
    cfg = _config(_write_jsonl(tmp_path / "biased.jsonl", rows), tiny_llama_dir, tmp_path / "o")
    report = audit_only(cfg, make_console(quiet=True))
    assert report["length_bias"]["severity"] == "warning" and report["length_bias"]["chosen_longer"] == pytest.approx(0.8, abs=0.15)
    near = report["near_identical_pairs"]
    assert near["severity"] == "warning" and near["count"] == 12
    assert "[[" in report["template"]["display"] and "rejected" in report["template"]["display"]


# ------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_llama_dir):
    from tuneforge.pipeline import run

    d = tmp_path_factory.mktemp("dpo")
    cfg = _config(_write_jsonl(d / "pairs.jsonl", preference_rows()), tiny_llama_dir, d / "out",
                  task={"beta": 0.1}, train={"epochs": 6, "learning_rate": 3e-3})
    return d / "out", run(cfg)


def test_pairs_train_by_dpo_and_beat_the_reference(dpo_run, tiny_llama_dir):
    """metrics.json holds the contract's keys; the tuned model ranks the test pairs better than the model it started
    from; the reference and length baselines are what they say."""
    from tuneforge.tasks.causal_lm.model import load_causal_lm, load_lm_tokenizer
    from tuneforge.tasks.causal_lm.preference import pair_logps, render_pairs
    from tuneforge.pipeline import prepare
    from rich.console import Console

    out, metrics = dpo_run
    stored = json.loads((out / "metrics.json").read_text())
    assert stored["main_metric"] == "preference_accuracy" and stored["kind"] == "preference"
    model, baselines = stored["test"]["model"], stored["test"]["baselines"]
    assert {"preference_accuracy", "reward_margin", "loss", "perplexity"} <= set(model)
    assert sorted(baselines) == ["length", "reference", "sft_chosen"]
    assert all("preference_accuracy" in b for b in baselines.values())
    assert model["preference_accuracy"] >= baselines["reference"]["preference_accuracy"] + 0.15
    assert model["reward_margin"] > 0
    history = stored["validation"]["history"]
    assert history[-1]["val_preference_accuracy"] > history[0]["val_preference_accuracy"]

    # the reference baseline: the starting model's own ranking of the test pairs, by log-probability
    import yaml
    from tuneforge.config import parse_config

    cfg = parse_config(yaml.safe_load((out / "config.yaml").read_text()))
    prep = prepare(cfg, Console(quiet=True))
    test = prep.y["test"]
    logp, _ = pair_logps(load_causal_lm(tiny_llama_dir), list(test), prep.tokenizer.pad_token_id, 16, "fp32")
    right = (logp[:, 0] > logp[:, 1]) + 0.5 * (logp[:, 0] == logp[:, 1])
    assert baselines["reference"]["preference_accuracy"] == pytest.approx(right.mean())
    # the length baseline: the answer with more tokens (ties half right)
    n = np.array([[len(p.chosen.ids) - p.chosen.prompt_len, len(p.rejected.ids) - p.rejected.prompt_len] for p in test])
    assert baselines["length"]["preference_accuracy"] == pytest.approx(((n[:, 0] > n[:, 1]) + 0.5 * (n[:, 0] == n[:, 1])).mean())
    assert (out / "baselines.tmp").exists() is False  # the SFT baseline's scratch checkpoints are gone


def test_dpo_report_card_and_audit(dpo_run):
    out, _ = dpo_run
    report = (out / "report.html").read_text()
    assert "<th>rejected</th>" in report and "preference_accuracy" in report
    card = (out / "model" / "README.md").read_text()
    assert "preference accuracy" in card.lower()
    audit = json.loads((out / "audit.json").read_text())
    assert {"length_bias", "near_identical_pairs", "template", "leakage"} <= set(audit)


def test_the_dpo_model_serves_as_any_causal_lm(dpo_run, capsys):
    """Plain transformers generates what `tuneforge predict` and the OpenAI route return."""
    import os
    import subprocess
    import sys

    import httpx
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import stop_process, wait_ready
    from tuneforge.cli import main
    from test_causal_lm_serving import _free_port

    out, metrics = dpo_run
    prompt = metrics["samples"][0]["prompt"]
    assert main(["predict", str(out), "--json", "--text", prompt]) == 0
    predicted = json.loads(capsys.readouterr().out)["completion"]
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    gen = model.generate(**ids)
    assert tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == predicted
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
           "TUNEFORGE_API_KEY": "k"}
    log = open(out.parent / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", str(out), "--port", str(port), "--device", "cpu",
                             "--precision", "fp32", "--force"], env=env, stdout=log, stderr=subprocess.STDOUT)  # not promoted: on this
    # toy data SFT on the chosen answers ranks better than the tiny DPO model
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc, lambda: (out.parent / "serve.log").read_text())
        auth = {"Authorization": "Bearer k"}
        model_id = httpx.get(f"{base}/v1/models", headers=auth, trust_env=False).json()["data"][0]["id"]
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": model_id, "messages": [{"role": "user", "content": prompt}]},
                       headers={"Authorization": "Bearer k"}, timeout=30, trust_env=False)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == predicted
    finally:
        stop_process(proc)
        log.close()


def test_quick_form_with_a_test_file(tmp_path, tiny_llama_dir, capsys):
    """`tuneforge run --task causal-lm --data pairs.jsonl --test-data test.jsonl`: the user's test pairs are the test
    split, scored as given and never trained on."""
    from tuneforge.cli import main

    rows = preference_rows(90)
    train, test = _write_jsonl(tmp_path / "train.jsonl", rows[:70]), _write_jsonl(tmp_path / "test.jsonl", rows[70:])
    code = main(["run", "--task", "causal-lm", "--data", str(train), "--test-data", str(test), "--model",
                 str(tiny_llama_dir), "--output", str(tmp_path / "o"), "--epochs", "1"])
    assert code == 0, capsys.readouterr().err[-2000:]
    data_report = json.loads((tmp_path / "o" / "data_report.json").read_text())
    assert data_report["splits"]["test"]["rows"] == 20
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["preference"]["pairs"] == 20 and "preference_accuracy" in metrics["test"]["model"]
