"""`tuneforge export`: a text-classification run to ONNX (checked independently with ONNX Runtime against the
transformers model, at batch and sequence sizes the export never saw; int8; served by `serve --runtime onnx`), a
causal-LM run (tiny Llama with a byte-level BPE tokenizer, LoRA) to GGUF f16 and q8_0, loaded back with
transformers' GGUF loader; and the errors a user can hit. Token and image classification's ONNX exports are tested
beside their pipelines (test_token_pipeline.py, test_image_classification.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tuneforge.cli import main
from tuneforge.config import parse_config
from tuneforge.pipeline import run

from conftest import make_rows

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_model_dir):
    import pandas as pd

    d = tmp_path_factory.mktemp("export-text")
    pd.DataFrame(make_rows(160)).to_csv(d / "data.csv", index=False)
    cfg = parse_config({"data": {"path": str(d / "data.csv"), "val_fraction": 0.2, "test_fraction": 0.25},
                        "model": {"name": str(tiny_model_dir), "max_length": 32},
                        "train": {"method": "full", "epochs": 2, "batch_size": 8, "learning_rate": 5e-3},
                        "eval": {"bootstrap_samples": 20, "baselines": ["majority"],
                                 "gate": {"min_margin": -1.0, "ci_lower_above_baseline": False}},
                        "output": {"dir": str(d / "out")}})
    run(cfg)
    return d / "out"


def test_onnx_export_matches_the_model_on_new_shapes_and_records_itself(text_run, capsys):
    import onnxruntime as ort
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = text_run
    assert main(["export", str(out), "--format", "onnx", "--quantize", "int8"]) == 0
    shown = capsys.readouterr().out
    assert "the same labels on 100.00%" in shown
    folder = out / "export" / "onnx"
    record = json.loads((out / "run.json").read_text())["exports"]["onnx"]
    assert record == json.loads((folder / "export.json").read_text())
    assert record["check"]["passed"] and record["check"]["rows"] == 40 and record["check"]["max_abs_diff"] < 1e-4
    assert record["int8"]["rows"] == 40 and record["files"]["model_int8.onnx"] < record["files"]["model.onnx"]
    assert record["files"]["model.onnx"] == (folder / "model.onnx").stat().st_size and record["seconds"] > 0
    assert {"config.json", "tokenizer.json"} <= set(record["files"]) and not list(folder.glob("*.safetensors"))

    # independently: ONNX Runtime on the export folder's own tokenizer, batch 3 and 27 tokens (the export saw 2 x 16)
    texts = ["good great superb lovely moving brilliant fun charming the film was very good indeed " + " ".join(
        str(i) for i in range(12)), "awful dull", "the plot was quite boring and the actor weak"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, return_tensors="np")
    assert batch["input_ids"].shape[1] > 16
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input_ids": batch["input_ids"].astype(np.int64),
                                      "attention_mask": batch["attention_mask"].astype(np.int64)})
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    with torch.no_grad():
        want = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_serve_runtime_onnx_gives_the_torch_predictions(text_run, tmp_path):
    from fastapi.testclient import TestClient

    from tuneforge.serving.app import ServeSettings, create_app, run_predictor
    from tuneforge.serving.monitor import load_reference
    from tuneforge.tasks.classification.predictor import Predictor

    out = text_run
    if not (out / "export" / "onnx" / "model_int8.onnx").is_file():
        assert main(["export", str(out), "--format", "onnx", "--quantize", "int8"]) == 0
    texts = ["good great fun", "dull boring weak tedious", "the plot"]
    direct = Predictor.load(out / "model").predict(texts)
    for runtime, tolerance in (("onnx", 1e-5), ("onnx-int8", 2e-2)):
        settings = ServeSettings(run_dir=out, api_key="k", monitor_url=f"sqlite:///{tmp_path / f'{runtime}.sqlite'}")
        predictor = run_predictor(out, runtime=runtime)
        with TestClient(create_app(settings, predictor, reference=load_reference(out))) as c:
            r = c.post("/v1/predict", json={"texts": texts}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200
        assert type(predictor.predictor.model).__name__ == "OnnxModel"
        preds = r.json()["predictions"]
        if runtime == "onnx":
            assert [p["label"] for p in preds] == [d["label"] for d in direct]
        for p, d in zip(preds, direct):
            for label, value in d["probabilities"].items():
                assert p["probabilities"][label] == pytest.approx(value, abs=tolerance)


def test_serve_runtime_onnx_without_an_export_or_after_retraining_exits_2(text_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(text_run, copy, ignore=shutil.ignore_patterns("export"))
    assert main(["serve", str(copy), "--runtime", "onnx", "--no-auth"]) == 2
    assert f"tuneforge export {copy} --format onnx" in capsys.readouterr().err
    shutil.copytree(text_run / "export", copy / "export")
    weights = copy / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # another model than the one exported
    assert main(["serve", str(copy), "--runtime", "onnx", "--no-auth"]) == 2
    assert "exported from another model" in capsys.readouterr().err


def test_export_errors_exit_2_with_the_fix(text_run, tmp_path, capsys):
    assert main(["export", str(text_run), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "a text-classification model exports to onnx" in err and "use --format onnx" in err
    assert main(["export", str(text_run), "--format", "onnx", "--quantize", "q8_0"]) == 2
    assert "--quantize q8_0 is not a onnx option" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "onnx"]) == 2
    assert "holds no finished run" in capsys.readouterr().err


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory):
    from test_causal_lm_pipeline import _config, _write_jsonl, pair_rows
    from tiny_models import build_tiny_llama

    d = tmp_path_factory.mktemp("export-llm")
    model = build_tiny_llama(d / "tiny-llama-bpe", bpe=True)
    cfg = _config(_write_jsonl(d / "pairs.jsonl", pair_rows(120)), model, d / "out", epochs=2, method="lora")
    run(cfg)
    return d / "out", model


def test_a_flipped_top_token_is_excused_only_within_the_exports_own_error():
    from tuneforge.export import near_tie_flips

    rng = np.random.default_rng(0)
    ref = [np.log(rng.dirichlet(np.ones(300))) for _ in range(3)]
    tops = [int(r.argmax()) for r in ref]
    seconds = [int(np.argsort(r)[-2]) for r in ref]
    noise = [rng.uniform(-0.03, 0.03, 300) for _ in range(3)]  # the export's error: up to 0.03 nats anywhere
    got = [r + e for r, e in zip(ref, noise)]
    # row 0: its top two 0.02 nats apart, the export swaps them within its error: a tie
    ref[0][seconds[0]] = ref[0][tops[0]] - 0.02
    got[0] = ref[0] + noise[0]
    got[0][tops[0]], got[0][seconds[0]] = ref[0][tops[0]] - 0.01, ref[0][tops[0]] + 0.01
    # row 1: the runner-up trails by far more than the error, and the export still prefers it: a real flip
    got[1][seconds[1]] = ref[1][tops[1]] + 0.5
    labels = [int(g.argmax()) for g in got]
    assert labels == [seconds[0], seconds[1], tops[2]] and ref[1][tops[1]] - ref[1][seconds[1]] > 0.1
    assert near_tie_flips(ref, tops, got, labels) == 1
    assert near_tie_flips(ref, tops, ref, tops) == 0


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_gguf_export_loads_back_with_the_same_next_tokens_tokenizer_and_template(llm_run, kind, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    out, _ = llm_run
    assert main(["export", str(out), "--format", "gguf", "--quantize", kind]) == 0
    folder = out / "export" / "gguf"
    record = json.loads((out / "run.json").read_text())["exports"]["gguf"]
    assert record["file"] == f"model-{kind}.gguf" and record["type"] == kind and record["check"]["passed"]
    check = record["check"]
    assert check["rows"] == 18 and check["top1_agreement"] * 18 + check["top1_near_ties"] >= 0.95 * 18
    assert check["top1_agreement"] >= 0.85  # a quantized export may flip a near tie, no more
    assert record["check"]["max_abs_diff"] < (0.05 if kind == "f16" else 0.5)
    assert (folder / "Modelfile").read_text().startswith(f"FROM ./model-{kind}.gguf\n")

    # independently, with transformers' own GGUF loader: tokenizer, chat template and logits of a new prompt
    merged = out / "model"
    tok = AutoTokenizer.from_pretrained(merged)
    back_tok = AutoTokenizer.from_pretrained(folder, gguf_file=record["file"])
    text = "tell me about cats and dogs 42 please"
    assert back_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert back_tok.chat_template == tok.chat_template
    back = AutoModelForCausalLM.from_pretrained(folder, gguf_file=record["file"], dtype=torch.float32,
                                                quantization_config=GgufConfig(dequantize=True)).eval()
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]])
    with torch.no_grad():
        a, b = model(ids).logits[0], back(ids).logits[0]
    assert bool((a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9)
    assert float((a - b).abs().max()) < (0.05 if kind == "f16" else 0.5)
    # a wrong q/k layout (the rotary permutation) would scramble attention: the logits would differ by far more
    assert float((a - b).abs().max()) < 0.1 * float(a.abs().max())
