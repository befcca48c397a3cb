"""Causal LM end to end on the tiny Llama, one run per data format (pairs, chats, plain text): what the run writes,
that it beats its baselines, that the baselines are what they say, and that plain transformers loads the exported
model and generates what tuneforge predicts."""
from __future__ import annotations

import json
import random

import pytest

FILLER = "what about tell me the a of is and say please".split()
ANSWERS = {"cats": "cats fur", "dogs": "dogs bark", "birds": "birds wings", "fish": "fish fins", "trees": "trees leaves"}
PHRASES = ["cats fur is wet", "dogs bark and night", "birds wings of day", "fish fins is wet", "trees leaves and rain",
           "the sun is hot", "the moon of night"]


def topic_prompt(rng: random.Random, i: int) -> tuple[str, str]:
    """2-5 filler words, a topic and a number, shuffled; the answer follows from the topic alone."""
    topic = rng.choice(sorted(ANSWERS))
    words = rng.sample(FILLER, rng.randint(2, 5)) + [topic, str(i % 60)]
    rng.shuffle(words)
    return " ".join(words), ANSWERS[topic]


def pair_rows(n: int = 200, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [dict(zip(("prompt", "completion"), topic_prompt(rng, i))) for i in range(n)]


def chat_rows(n: int = 200, seed: int = 1) -> list[dict]:
    """Every third row opens with a system message; every other row is two user/assistant exchanges."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": "you are helpful"}] if i % 3 == 0 else []
        for _ in range(2 if i % 2 else 1):
            prompt, answer = topic_prompt(rng, i)
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    return rows


def text_words(n_words: int, rng: random.Random) -> list[str]:
    words = []
    while len(words) < n_words:
        words += rng.choice(PHRASES).split() + [str(rng.randrange(60))]
    return words[:n_words]


def text_rows(n: int = 120, seed: int = 2) -> list[dict]:
    """Phrases with numbers between them; every third text has 40-60 words, longer than max_length 32 tokens.
    No text has a multiple of 32 words (tokens = words + EOS), so each chunk count is ceil((words + 1) / 32)."""
    rng = random.Random(seed)
    lengths = [rng.randint(40, 60) if i % 3 == 0 else rng.randint(8, 24) for i in range(n)]
    return [{"text": " ".join(text_words(k, rng))} for k in lengths]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(data, model_dir, out, max_length: int = 32, **train):
    from tuneforge.config import parse_config

    return parse_config({"task": {"type": "causal-lm"},
                         "data": {"path": str(data), "val_fraction": 0.15, "test_fraction": 0.15},
                         "model": {"name": str(model_dir), "max_length": max_length},
                         "train": {"method": "full", "epochs": 10, "learning_rate": 1e-2, "early_stopping_patience": 0,
                                   **train},
                         "eval": {"bootstrap_samples": 50},
                         "output": {"dir": str(out), "keep_adapter": train.get("method") == "lora"}})


def _run_spying_on_baselines(cfg) -> tuple[dict, dict]:
    """The run's metrics, and what the task's baselines() was given and returned (generations are not stored)."""
    import tuneforge.tasks.causal_lm.baselines as module
    from tuneforge.pipeline import run

    seen = {}
    original = module.baselines

    def spy(cfg, space, splits, y, predictor, precision):
        seen.update(splits=splits, space=space, result=original(cfg, space, splits, y, predictor, precision))
        return seen["result"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "baselines", spy)
        metrics = run(cfg)
    return metrics, seen


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory, tiny_llama_dir):
    d = tmp_path_factory.mktemp("lm-pairs")
    cfg = _config(_write_jsonl(d / "pairs.jsonl", pair_rows()), tiny_llama_dir, d / "out")
    metrics, seen = _run_spying_on_baselines(cfg)
    return d / "out", metrics, seen


@pytest.fixture(scope="module")
def chats_run(tmp_path_factory, tiny_llama_dir):
    d = tmp_path_factory.mktemp("lm-chats")
    cfg = _config(_write_jsonl(d / "chats.jsonl", chat_rows()), tiny_llama_dir, d / "out", max_length=64, method="lora",
                  lora={"r": 8, "alpha": 16, "dropout": 0.0})
    metrics, seen = _run_spying_on_baselines(cfg)
    return d / "out", metrics, seen


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_llama_dir):
    d = tmp_path_factory.mktemp("lm-text")
    rows = text_rows()
    cfg = _config(_write_jsonl(d / "texts.jsonl", rows), tiny_llama_dir, d / "out", epochs=5)
    metrics, seen = _run_spying_on_baselines(cfg)
    return d / "out", metrics, seen, rows


# ------------------------------------------------------------------ pairs

def test_pairs_run_writes_every_metric_and_beats_the_baselines(pairs_run):
    out, metrics, _ = pairs_run
    stored = json.loads((out / "metrics.json").read_text())
    assert stored["main_metric"] == "rouge_l" and stored["kind"] == "pair"
    model = stored["test"]["model"]
    for key in ("loss", "perplexity", "exact_match", "rouge_l", "chrf", "accuracy", "macro_f1"):
        assert key in model, key
    assert model["rouge_l"] == 1.0 and model["exact_match"] == 1.0
    baselines = stored["test"]["baselines"]
    assert sorted(baselines) == ["base_few_shot", "base_zero_shot", "retrieval"]
    assert {"loss", "perplexity"} <= set(baselines["base_zero_shot"])
    assert model["perplexity"] < baselines["base_zero_shot"]["perplexity"]
    for name, b in baselines.items():
        assert {"rouge_l", "accuracy", "macro_f1"} <= set(b), name
        assert model["rouge_l"] > b["rouge_l"], name
    assert stored["labels"] == sorted(ANSWERS.values())  # the completions form a closed set
    assert stored["beats_baselines"] is True and stored["promoted"] is True


def test_pairs_run_writes_readable_artifacts(pairs_run):
    out, metrics, _ = pairs_run
    generation = json.loads((out / "model" / "generation_config.json").read_text())
    assert generation["do_sample"] is False
    assert generation["max_new_tokens"] == metrics["max_new_tokens"] == 4  # 1.25 x (2 words + <|im_end|>)
    assert "Sample generations" in (out / "report.html").read_text()
    template = json.loads((out / "audit.json").read_text())["template"]
    assert template["chat_template"] is True
    assert len(template["examples"]) == 2
    for ex in template["examples"]:  # the trained tokens, and only those, between [[ ]]
        answer = ex["rendered"].split("[[")[1]
        assert answer.removesuffix(" <|im_end|>]]") in ANSWERS.values()
        assert ex["rendered"].startswith("<|im_start|> user ")
    assert json.loads((out / "run.json").read_text())["task"]["model_class"] == "AutoModelForCausalLM"
    assert not (out / "adapter").exists()  # full fine-tuning has no adapter to keep


def test_retrieval_baseline_is_the_completion_of_the_nearest_training_prompt(pairs_run):
    from tuneforge.tasks.causal_lm.metrics import TfidfIndex, score_generations

    _, metrics, seen = pairs_run
    train, test = seen["splits"].train, seen["splits"].test
    nearest = TfidfIndex(list(train.texts)).nearest(list(test.texts), 1)
    expected = [train.labels[js[0]] for js in nearest]
    assert seen["result"]["retrieval"]["generations"] == expected
    scored = score_generations(expected, list(test.labels), metrics["labels"], 0, 0)
    assert metrics["test"]["baselines"]["retrieval"]["rouge_l"] == pytest.approx(scored["rouge_l"])
    assert metrics["test"]["baselines"]["retrieval"]["accuracy"] == pytest.approx(scored["accuracy"])


def test_zero_shot_baseline_is_the_untuned_model_with_the_same_template(pairs_run, tiny_llama_dir):
    import torch

    from tuneforge.tasks.causal_lm.generate import CompletionPredictor
    from tuneforge.tasks.causal_lm.model import load_causal_lm, load_lm_tokenizer

    _, metrics, seen = pairs_run
    test = seen["splits"].test
    base = CompletionPredictor(load_causal_lm(tiny_llama_dir), load_lm_tokenizer(tiny_llama_dir),
                               {"chat_template": True}, torch.device("cpu"))
    expected = base.complete_ids([base.prompt_of(m[:-1]) for m in test.extras["messages"]], metrics["max_new_tokens"])
    got = seen["result"]["base_zero_shot"]["generations"]
    assert got == expected
    assert [s["base_zero_shot"] for s in metrics["samples"]] == expected[:len(metrics["samples"])]
    assert got != list(test.labels)  # the untuned model does not already answer


def test_plain_transformers_generates_what_tuneforge_predicts(pairs_run, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.cli import main

    out, metrics, seen = pairs_run
    prompts = list(seen["splits"].test.texts[:3])
    references = list(seen["splits"].test.labels[:3])
    assert main(["predict", str(out), "--json", *[a for p in prompts for a in ("--text", p)]]) == 0
    predicted = [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()]

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert model.generation_config.do_sample is False
    plain = []
    for p in prompts:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            return_dict=True, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**enc)  # greedy and the stop token from the exported generation_config.json
        plain.append(tokenizer.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert plain == predicted == references


# ------------------------------------------------------------------ chats (LoRA, adapter kept)

def test_chats_with_system_and_two_turns_train_and_beat_the_untuned_model(chats_run):
    out, metrics, seen = chats_run
    assert metrics["kind"] == "chat"
    test = seen["splits"].test
    kinds = {(m[0]["role"] == "system", sum(t["role"] == "assistant" for t in m)) for m in test.extras["messages"]}
    assert kinds == {(False, 1), (False, 2), (True, 1), (True, 2)}  # every shape reaches the test split
    model = metrics["test"]["model"]
    assert model["rouge_l"] == 1.0
    assert model["rouge_l"] > metrics["test"]["baselines"]["base_zero_shot"]["rouge_l"]
    assert metrics["promoted"] is True


def test_chats_render_the_system_message_and_both_answers_trained(chats_run):
    out, _, _ = chats_run
    examples = json.loads((out / "audit.json").read_text())["template"]["examples"]
    assert len(examples) == 2  # the first two training rows; a row's number says its shape (see chat_rows)
    for ex in examples:
        rendered = ex["rendered"]
        assert rendered.startswith("<|im_start|> system you are helpful <|im_end|>") == (ex["row"] % 3 == 0)
        assert rendered.count("[[") == (2 if ex["row"] % 2 else 1)


def test_chats_generation_budget_follows_the_longest_single_answer(chats_run):
    _, metrics, _ = chats_run
    assert metrics["max_new_tokens"] == 4  # ceil(1.25 x (2 words + <|im_end|>)), as for the pairs


def test_lora_run_keeps_its_adapter_beside_the_merged_model(chats_run, tiny_llama_dir):
    from safetensors import safe_open

    out, _, _ = chats_run
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (8, 16, "CAUSAL_LM")
    linear = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
              "self_attn.q_proj", "self_attn.v_proj"]
    assert sorted(config["target_modules"]) == [f"model.layers.{n}.{m}" for n in (0, 1) for m in linear]  # not lm_head
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * 2 * 7  # A and B of each
    assert json.loads((out / "model" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_kept_adapter_on_the_base_model_generates_what_the_merged_model_does(chats_run, tiny_llama_dir):
    from peft import PeftModel

    from tuneforge.tasks.causal_lm.generate import CompletionPredictor, generate_ids
    from tuneforge.tasks.causal_lm.model import load_causal_lm

    out, _, seen = chats_run
    merged = CompletionPredictor.load(out / "model")
    prompts = [merged.prompt_of(m[:-1]) for m in seen["splits"].test.extras["messages"][:6]]
    adapter = PeftModel.from_pretrained(load_causal_lm(tiny_llama_dir), str(out / "adapter"))
    expected = generate_ids(merged.model, prompts, merged.pad_id, merged.stops, 4)
    assert generate_ids(adapter, prompts, merged.pad_id, merged.stops, 4) == expected
    assert generate_ids(load_causal_lm(tiny_llama_dir), prompts, merged.pad_id, merged.stops, 4) != expected


# ------------------------------------------------------------------ plain text

def test_text_run_is_judged_on_perplexity_against_the_untuned_model(text_run):
    out, metrics, _, _ = text_run
    assert metrics["kind"] == "text" and metrics["main_metric"] == "perplexity"
    assert list(metrics["test"]["baselines"]) == ["base_zero_shot"]
    assert metrics["test"]["model"]["perplexity"] < metrics["test"]["baselines"]["base_zero_shot"]["perplexity"]
    assert "rouge_l" not in metrics["test"]["model"] and metrics["samples"] == []
    assert metrics["promoted"] is True  # lower is better: the gate compares the other way round


def test_text_run_audit_reports_the_texts_cut_into_chunks(text_run):
    out, _, seen, rows = text_run
    truncation = json.loads((out / "audit.json").read_text())["truncation"]
    pieces = {len(r["text"].split()): -(-(len(r["text"].split()) + 1) // 32) for r in rows}
    train = list(seen["splits"].train.extras["text"])
    expected = sum(pieces[len(t.split())] > 1 for t in train)
    assert expected > 0
    assert truncation["texts_chunked"] == expected
    assert sum(truncation["chunks"].values()) == sum(pieces[len(r["text"].split())] for r in rows)
    assert f"{expected} training texts longer than 32 tokens are cut into consecutive chunks" in truncation["summary"]


def test_interrupted_lora_run_resumes_to_the_same_weights(tmp_path, tiny_llama_dir, monkeypatch):
    """Ctrl-C at step 5 of a packed LoRA run, then --resume: the same merged weights as a run never stopped."""
    import torch
    from safetensors.torch import load_file

    from tuneforge.pipeline import run
    from tuneforge.training import loop

    data = _write_jsonl(tmp_path / "pairs.jsonl", pair_rows(120))
    lora = {"method": "lora", "epochs": 2, "checkpoint_every": 1, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}
    run(_config(data, tiny_llama_dir, tmp_path / "straight", **lora))
    real_step, calls = loop._optimizer_step, {"n": 0}

    def interrupt_at_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_optimizer_step", interrupt_at_5)
    cfg = _config(data, tiny_llama_dir, tmp_path / "resumed", **lora)
    with pytest.raises(loop.TrainingInterrupted, match="--resume"):
        run(cfg)
    assert not (tmp_path / "resumed" / "run.json").exists()
    monkeypatch.setattr(loop, "_optimizer_step", real_step)
    run(cfg, resume=True)
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_trains_to_the_same_loss(tiny_llama_dir):
    """train.gradient_checkpointing recomputes activations: the same loss and gradients, less memory."""
    import torch

    from tuneforge.config import TrainConfig
    from tuneforge.models.load import apply_method
    from tuneforge.tasks.causal_lm.task import TASK
    from tuneforge.tasks.causal_lm.encoding import encode_chat, pack
    from tuneforge.tasks.causal_lm.generate import packed_loss
    from tuneforge.tasks.causal_lm.model import load_causal_lm, load_lm_tokenizer
    from tuneforge.training.loop import TrainData, training_batch

    tok = load_lm_tokenizer(tiny_llama_dir)
    rows = pair_rows(6)
    examples = [encode_chat(tok, [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
                            True) for r in rows]
    ids, labels, positions = pack(examples, 64)
    grads = []
    for checkpointing in (False, True):
        model = apply_method(load_causal_lm(tiny_llama_dir, seed=0), TrainConfig(
            method="lora", learning_rate=1e-3, gradient_checkpointing=checkpointing, lora={"r": 4, "alpha": 8, "dropout": 0.0}),
            "CAUSAL_LM", "all-linear")
        model.train()
        assert model.base_model.model.is_gradient_checkpointing is checkpointing
        batch = training_batch(TrainData(ids, labels, positions), list(range(len(ids))), 2, torch.device("cpu"), TASK.collate)
        loss = packed_loss(model, batch)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][name], rtol=1e-4, atol=1e-6)
