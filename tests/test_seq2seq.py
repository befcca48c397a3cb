"""Sequence-to-sequence end to end on tiny random T5 and BART models built in the test and on the offline default
(BERT2BERT from the packaged MiniLM): the real pipeline, the export under plain transformers' generate, predict,
serving, the data's errors, and the pieces (decoder inputs, ROUGE, the lead baseline)."""
import json
import random
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tuneforge.cli import main
from tuneforge.config import parse_config
from tuneforge.pipeline import run

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build_tiny_bart, build_tiny_t5  # noqa: E402

# no target holds its topic word: a model that wrote from the target instead of the source would not find it
TOPICS = {"cats": "have fur", "dogs": "bark", "birds": "have wings", "fish": "have fins"}
FILLER = "the a of with in on under over near big small red blue green old new quick slow happy sad loud quiet".split()


def topic_rows(n: int, seed: int = 0, source: str = "source", target: str = "target") -> list[dict]:
    """A topic word hidden among six filler words -> that topic's fixed phrase: the model must find the one word
    that matters; TF-IDF retrieval is misled by the filler words the sources share."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        topic = rng.choice(list(TOPICS))
        words = rng.sample(FILLER, 6)
        words.insert(rng.randrange(7), topic)
        out.append({source: " ".join(words), target: TOPICS[topic]})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="session")
def tiny_bart_dir(tmp_path_factory):
    return build_tiny_bart(tmp_path_factory.mktemp("tiny-bart"))


def _config(data, model, out, train=None, **task):
    return parse_config({"task": {"type": "seq2seq", **task},
                         "data": {"path": str(data), "val_fraction": 0.15, "test_fraction": 0.2},
                         "model": {"name": str(model)},
                         "train": {"method": "full", "epochs": 6, "batch_size": 16, "learning_rate": 3e-3,
                                   "early_stopping_patience": 0, **(train or {})},
                         "eval": {"bootstrap_samples": 200, "batch_size": 32}, "output": {"dir": str(out)}})


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory, tiny_t5_dir):
    d = tmp_path_factory.mktemp("t5")
    data = write_jsonl(d / "topics.jsonl", topic_rows(240))
    metrics = run(_config(data, tiny_t5_dir, d / "out", val_generations=16))
    return d / "out", metrics


def _plain_generate(model_dir: Path, texts: list[str]) -> list[str]:
    """What a user gets with plain transformers and the exported generation_config.json."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    with torch.no_grad():
        out = model.generate(**tok(texts, return_tensors="pt", padding=True))
    return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


def test_t5_learns_the_topics_beats_every_baseline_and_reports_each_metric_with_a_ci(t5_run):
    out, metrics = t5_run
    saved = json.loads((out / "metrics.json").read_text())
    model, base = saved["test"]["model"], saved["test"]["baselines"]
    assert set(base) == {"lead", "retrieval", "untuned"}
    for key in ("rouge_1", "rouge_2", "rouge_l", "rouge_lsum", "chrf", "exact_match"):
        assert key in model and model["ci_by_metric"][key]["low"] <= model[key] <= model["ci_by_metric"][key]["high"]
        assert all(key in b for b in base.values())
    assert model["exact_match"] >= 0.9 and model["rouge_l"] > base["retrieval"]["rouge_l"] + 0.1
    assert saved["promoted"] and saved["best_baseline"] == "retrieval"
    assert base["lead"]["exact_match"] == 0.0  # the filler words are not the answer
    assert model["loss"] < base["untuned"]["loss"]  # the same targets, scored before and after tuning
    history = saved["validation"]["history"]
    assert saved["validation"]["metric"] == "loss" and "val_rouge_l" in history[-1] and "val_exact_match" in history[-1]
    assert history[-1]["val_rouge_l"] > history[0]["val_rouge_l"] and history[-1]["val_exact_match"] >= 0.9
    card = (out / "model" / "README.md").read_text()
    assert "pipeline_tag: text2text-generation" in card and "AutoModelForSeq2SeqLM" in card
    html = (out / "report.html").read_text()
    assert "Sample generations" in html and "have fur" in html
    assert (out / "model" / "model.safetensors").is_file() and not list((out / "model").glob("*.bin"))


def test_plain_transformers_generate_gives_what_tuneforge_predict_gives(t5_run, capsys):
    out, _ = t5_run
    texts = [r["source"] for r in topic_rows(6, seed=99)]
    plain = _plain_generate(out / "model", texts)
    argv = ["predict", str(out), "--json"] + [a for t in texts for a in ("--text", t)]
    assert main(argv) == 0
    ours = [json.loads(line)["generation"] for line in capsys.readouterr().out.strip().splitlines()]
    assert ours == plain
    assert [TOPICS[next(w for w in t.split() if w in TOPICS)] for t in texts] == ours  # and it is right
    table = write_jsonl(out.parent / "to_predict.jsonl", topic_rows(6, seed=99))  # its source column found as in training
    assert main(["predict", str(out), "--input", str(table), "--json"]) == 0
    assert [json.loads(line)["generation"] for line in capsys.readouterr().out.strip().splitlines()] == ours
    gen = json.loads((out / "model" / "generation_config.json").read_text())
    assert gen["num_beams"] == 1 and gen["do_sample"] is False and gen["decoder_start_token_id"] == 0


def test_serving_generates_for_texts_and_watches_source_and_output_length(t5_run, tmp_path):
    from tuneforge.serving.app import ServeSettings, create_app, run_predictor
    from tuneforge.serving.monitor import load_reference

    out, metrics = t5_run
    settings = ServeSettings(run_dir=out, api_key="k", monitor_url=f"sqlite:///{tmp_path / 'log.sqlite'}")
    auth = {"Authorization": "Bearer k"}
    texts = [r["source"] for r in topic_rows(3, seed=5)]
    with TestClient(create_app(settings, run_predictor(out), reference=load_reference(out))) as c:
        r = c.post("/v1/predict", json={"texts": texts}, headers=auth)
        assert r.status_code == 200
        preds = r.json()["predictions"]
        assert [p["generation"] for p in preds] == _plain_generate(out / "model", texts)
        assert all(p["finish_reason"] == "stop" and 0 < p["output_tokens"] <= p["max_tokens"] for p in preds)
        assert c.post("/v1/predict", json={"texts": ["x" * 20_000]}, headers=auth).status_code == 422
        assert c.post("/v1/predict", json={"texts": texts}).status_code == 401
        monitor = c.get("/v1/monitor", headers=auth).json()
    assert monitor["status"] == "insufficient_data"
    reference = json.loads((out / "model" / "reference_profile.json").read_text())
    assert reference["n"] == metrics["test"]["model"]["n"]  # the test sources and their generations
    names, shares = reference["label"]["names"], reference["label"]["shares"]
    assert shares[names.index("(truncated)")] == 0 and shares[names.index("(empty)")] == 0  # each ended on its own
    assert abs(sum(reference["confidence"]["shares"]) - 1) < 1e-9 and "length" in reference


def test_bart_with_lora_from_the_quick_form_trains_and_exports_a_merged_model(tmp_path, tiny_bart_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", topic_rows(200, seed=1, source="input", target="output"))
    out = tmp_path / "out"
    code = main(["run", "--task", "seq2seq", "--data", str(data), "--model", str(tiny_bart_dir), "--output", str(out),
                 "--method", "lora", "--epochs", "3"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["model"]["loss"] < metrics["test"]["baselines"]["untuned"]["loss"]
    files = sorted(p.name for p in (out / "model").iterdir())
    assert "model.safetensors" in files and "adapter_config.json" not in files  # LoRA merged into plain weights
    texts = [r["input"] for r in topic_rows(4, seed=7, source="input", target="output")]
    from tuneforge.tasks.seq2seq.generate import Seq2SeqPredictor

    assert [p["generation"] for p in Seq2SeqPredictor.load(out / "model").predict(texts)] == _plain_generate(out / "model", texts)


def test_the_offline_default_bert2bert_trains_exports_reloads_and_serves(tmp_path):
    from tuneforge.serving.app import ServeSettings, create_app, run_predictor

    rows = [{"prompt": f"the {w} is near the {v}", "completion": w} for w in ("cat", "dog", "bird", "fish", "tree")
            for v in ("house", "river", "car", "hill", "road", "park")]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    cfg = parse_config({"task": {"type": "seq2seq", "val_generations": 4, "num_beams": 2},
                        "data": {"path": str(data), "val_fraction": 0.2, "test_fraction": 0.2},
                        "train": {"max_steps": 4, "batch_size": 8, "eval_every": 2},
                        "eval": {"bootstrap_samples": 0, "gate": {"ci_lower_above_baseline": False}},
                        "output": {"dir": str(out)}})
    assert cfg.model.name == "bert2bert-minilm" and cfg.train.method == "full"
    metrics = run(cfg)
    assert metrics["test"]["model"]["loss"] < metrics["test"]["baselines"]["untuned"]["loss"]
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["model_type"] == "encoder-decoder" and config["decoder_start_token_id"] == 101  # [CLS]
    assert json.loads((out / "model" / "generation_config.json").read_text())["num_beams"] == 2  # beam search, exported
    texts = ["the cat is near the house", "the fish is near the road"]
    plain = _plain_generate(out / "model", texts)
    with TestClient(create_app(ServeSettings(run_dir=out, api_key=None), run_predictor(out))) as c:
        r = c.post("/v1/predict", json={"texts": texts})
    assert r.status_code == 200 and [p["generation"] for p in r.json()["predictions"]] == plain


def test_decoder_inputs_are_the_start_token_then_the_target_shifted_and_give_the_models_own_loss(tiny_bart_dir, tiny_t5_dir):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from tuneforge.tasks.seq2seq.generate import (batch, encode_sources, encode_targets, example_losses, kept_logits,
                                                  target_loss)

    for model_dir, start in ((tiny_t5_dir, 0), (tiny_bart_dir, 2)):
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        sources = encode_sources(tok, ["cats with red", "the dogs near a big old quiet fish"], "summarize: ", None)
        assert tok.decode(sources[0], skip_special_tokens=True).startswith("summarize")
        targets = encode_targets(tok, ["cats have fur", "dogs bark"], 3, start)
        assert targets[0][-1] == tok.eos_token_id and len(targets[0]) == 3  # cut to 3, the end token kept
        b = batch([{"input_ids": s, "labels": t} for s, t in zip(sources, targets)], tok.pad_token_id, 8)
        assert b["decoder_input_ids"][0, 0] == start and b["decoder_input_ids"][0, 1:3].tolist() == list(targets[0][:2])
        assert b["labels"].shape[1] % 8 == 0 and (b["labels"][1, len(targets[1]):] == -100).all()
        model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir)).eval()
        with torch.no_grad():
            ours = model(**b).loss
            theirs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            # the head run on the target tokens only: the same loss, and the same per-example sums
            cut = target_loss(model, dict(b))
            keep = b["labels"] != -100
            head_rows = kept_logits(model, {k: v for k, v in b.items() if k != "labels"}, keep)
            assert head_rows.shape == (int(keep.sum()), model.config.vocab_size)  # the head ran on the targets only
            nll, count = example_losses(model, sources, targets, tok.pad_token_id)
        assert torch.allclose(ours, theirs)  # the model's own shift of the labels builds the same decoder inputs
        assert torch.allclose(cut, theirs, atol=1e-5)
        assert count.tolist() == [len(t) for t in targets] and abs(nll.sum() / count.sum() - float(theirs)) < 1e-4


def test_targets_end_with_the_end_token_once_and_a_whole_column_pair_wins(tmp_path):
    from tiny_models import _word_tokenizer

    from tuneforge.tasks.seq2seq.data import columns
    from tuneforge.tasks.seq2seq.generate import encode_targets
    from tuneforge.tasks.seq2seq.spec import Seq2SeqTaskConfig

    bare, vocab = _word_tokenizer(["<pad>", "</s>", "<unk>"], "$A", unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    assert bare("cats have fur")["input_ids"][-1] != 1  # this tokenizer adds no end token ...
    assert [t[-1] for t in encode_targets(bare, ["cats have fur", "dogs"], None, 0, 1)] == [1, 1]  # ... training does
    t5_like, _ = _word_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    assert encode_targets(t5_like, ["dogs bark"], None, 0, 1)[0] == [vocab["dogs"], vocab["bark"], 1]  # not twice
    task = Seq2SeqTaskConfig(type="seq2seq")
    assert columns(["source", "prompt", "completion"], task, tmp_path / "f.csv") == ("prompt", "completion")


def test_rouge_and_the_lead_baseline():
    from tuneforge.tasks.seq2seq.baselines import lead, typical_words
    from tuneforge.tasks.seq2seq.metrics import rouge, score, sentence_lines

    same = rouge("The cat sat. It purred!", "the cat sat. it purred")
    assert same == {"rouge_1": 1.0, "rouge_2": 1.0, "rouge_l": 1.0, "rouge_lsum": 1.0}
    r = rouge("cat the sat", "the cat sat")
    assert r["rouge_1"] == 1.0 and r["rouge_2"] == pytest.approx(0.0) and r["rouge_l"] == pytest.approx(2 / 3)
    # Lsum: the longest common subsequence per reference sentence, over the union of the candidate's sentences
    swapped = rouge("c d. a b", "a b. c d")
    assert swapped["rouge_l"] == pytest.approx(0.5) and swapped["rouge_lsum"] == pytest.approx(1.0)
    assert sentence_lines('One. "Two!" Three') == 'One.\n"Two!"\nThree'
    assert rouge("", "") == {k: 1.0 for k in same} and rouge("x", "")["rouge_1"] == 0.0
    assert typical_words(["a b", "a b c d", "a b c"]) == 3
    assert lead("First one here. Second one. Third.", 5) == "First one here. Second one."
    assert lead("A long first sentence of many words. Then.", 3) == "A long first"
    s = score(["cats have fur", "dogs"], ["cats have fur", "dogs bark"], 100, 0)
    assert s["exact_match"] == 0.5 and s["n"] == 2 and s["ci_by_metric"]["exact_match"]["low"] == 0.0


def _bad(capsys, data, model, out, *extra):
    code = main(["run", "--task", "seq2seq", "--data", str(data), "--model", str(model), "--output", str(out),
                 "--epochs", "1", *extra])
    return code, capsys.readouterr().err


def test_bad_data_and_models_exit_2_naming_what_to_fix(tmp_path, tiny_t5_dir, tiny_model_dir, capsys):
    rows = topic_rows(30)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"source": r["source"]} for r in rows])
    code, err = _bad(capsys, missing, tiny_t5_dir, tmp_path / "o1")
    assert code == 2 and "missing.jsonl" in err and "'target' not found" in err
    empty = write_jsonl(tmp_path / "empty.jsonl", rows[:5] + [{"source": "cats", "target": "  "}] + rows[5:])
    code, err = _bad(capsys, empty, tiny_t5_dir, tmp_path / "o2")
    assert code == 2 and "empty.jsonl" in err and "target is empty" in err and "row 5" in err.replace("row  ", "row ")
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": r["source"]} for r in rows])
    code, err = _bad(capsys, other, tiny_t5_dir, tmp_path / "o3")
    assert code == 2 and "no seq2seq columns" in err and "source" in err
    good = write_jsonl(tmp_path / "good.jsonl", rows)
    code, err = _bad(capsys, good, tiny_model_dir, tmp_path / "o4")
    assert code == 2 and "not an encoder-decoder" in err and "text- or token-classification" in err
    code, err = _bad(capsys, good, tiny_t5_dir, tmp_path / "o5", "--method", "frozen")
    assert code == 2 and "frozen" in err and "lora" in err


def test_named_columns_a_prefix_and_cut_targets_reach_the_audit(tmp_path, tiny_t5_dir):
    from tuneforge.pipeline import audit_only
    from tuneforge.runlog import make_console

    rows = [{"report": r["source"], "summary": r["target"] + " and more words to cut"} for r in topic_rows(40)]
    data = write_jsonl(tmp_path / "named.jsonl", rows)
    cfg = parse_config({"task": {"type": "seq2seq", "source_column": "report", "target_column": "summary",
                                 "prefix": "summarize: ", "max_target_length": 4},
                        "data": {"path": str(data)}, "model": {"name": str(tiny_t5_dir)},
                        "train": {"method": "full"}, "output": {"dir": str(tmp_path / "o")}})
    report = audit_only(cfg, make_console(quiet=True))
    cut = report["target_truncation"]
    assert cut["severity"] == "warning" and cut["splits"]["train"]["truncated"] == cut["splits"]["train"]["rows"] > 0
    assert report["target_copies_source"]["severity"] == "info"


def test_two_processes_weighted_by_target_tokens_follow_one(tmp_path, tiny_t5_dir):
    """DDP (`--nproc 2`): the targets travel to the other process with their start token, the head still runs on the
    target tokens only behind DDP's wrapper, and each process's loss is weighted by its share of the batch's target
    tokens, so two processes follow one (the tiny T5 has no dropout)."""
    import numpy as np
    import yaml
    from test_distributed import _cli, _one_process, _results

    data = write_jsonl(tmp_path / "topics.jsonl", topic_rows(120))
    for name in ("one", "two"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": {"type": "seq2seq", "val_generations": 0}, "model": {"name": str(tiny_t5_dir)},
            "data": {"path": str(data), "val_fraction": 0.15, "test_fraction": 0.15},
            "train": {"method": "full", "epochs": 2, "batch_size": 8, "learning_rate": 3e-3, "precision": "fp32",
                      "early_stopping_patience": 0},
            "eval": {"bootstrap_samples": 20, "baselines": ["lead"]}, "output": {"dir": str(tmp_path / name)}}))
    _one_process(tmp_path / "one.yaml")
    proc = _cli(["run", str(tmp_path / "two.yaml"), "--nproc", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (m1, r1), (m2, r2) = _results(tmp_path / "one"), _results(tmp_path / "two")
    assert r2["distributed"]["processes"] == 2 and r1["steps"] == r2["steps"]
    h1, h2 = m1["validation"]["history"], m2["validation"]["history"]
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose([h[key] for h in h2], [h[key] for h in h1], atol=1e-4)
