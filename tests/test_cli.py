"""The command line as a user meets it: exit codes, messages without tracebacks, nothing half-written."""
import importlib.metadata
import json
import shutil
import subprocess
import sys

import pytest

from tuneforge.cli import main

from conftest import make_rows


def _bad(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and err.startswith("error: ")
    return err


def _quick(tmp_path, data, model, *extra):
    return ["run", "--data", str(data), "--text-column", "text", "--label-column", "label",
            "--model", str(model), "--output", str(tmp_path / "out"), *extra]


def test_bad_inputs_exit_2_and_leave_no_output(capsys, tmp_path, write_csv, tiny_model_dir):
    good = write_csv(make_rows(40))
    cases = {
        "missing file": (_quick(tmp_path, tmp_path / "none.csv", tiny_model_dir), "does not exist"),
        "missing column": (_quick(tmp_path, good, tiny_model_dir)[:4] + ["review"] + _quick(tmp_path, good, tiny_model_dir)[5:],
                           "column 'review' not found"),
        "unknown model": (_quick(tmp_path, good, "no-such-model"), "model 'no-such-model'"),
    }
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9 good,pos\nbad,neg\n".encode("latin-1"))
    cases["non-utf8"] = (_quick(tmp_path, latin, tiny_model_dir), "row 0")
    single = write_csv([r for r in make_rows(30) if r["label"] == "pos"], "single.csv")
    cases["single class"] = (_quick(tmp_path, single, tiny_model_dir), "only one class")
    for name, (argv, expected) in cases.items():
        err = _bad(capsys, argv)
        assert expected in err, name
        assert "fix:" in err, name
        assert not (tmp_path / "out").exists(), name


def test_config_typo_exit_2(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {path: x.csv}\ntrain: {epoch: 2}\n")
    err = _bad(capsys, ["run", str(cfg)])
    assert "train.epoch" in err and "Did you mean 'epochs'" in err


def test_quick_start_then_predict_then_refuse_to_clobber(capsys, tmp_path, write_csv, tiny_model_dir):
    data = write_csv(make_rows(60))
    assert main(_quick(tmp_path, data, tiny_model_dir, "--epochs", "2")) == 0
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "out"), "--text", "good great film", "--text", "awful", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [l["text"] for l in lines] == ["good great film", "awful"]
    assert all(abs(sum(l["probabilities"].values()) - 1) < 1e-5 for l in lines)
    assert all(l["label"] == max(l["probabilities"], key=l["probabilities"].get) for l in lines)
    from tuneforge.tasks.classification.predictor import Predictor

    direct = Predictor.load(tmp_path / "out" / "model").predict(["good great film", "awful"])
    assert [l["label"] for l in lines] == [r["label"] for r in direct]

    texts = tmp_path / "texts.txt"
    texts.write_text("lovely moving\n\nboring flat\n")
    assert main(["predict", str(tmp_path / "out"), "--input", str(texts)]) == 0
    out = capsys.readouterr().out
    assert "lovely moving" in out and "boring flat" in out

    latin = tmp_path / "latin.txt"
    latin.write_bytes("fine\ncaf\xe9 good\n".encode("latin-1"))
    err = _bad(capsys, ["predict", str(tmp_path / "out"), "--input", str(latin)])
    assert "latin.txt" in err and "row 1" in err

    err = _bad(capsys, _quick(tmp_path, data, tiny_model_dir))
    assert "already holds a finished run" in err and "--overwrite" in err
    err = _bad(capsys, _quick(tmp_path, data, tiny_model_dir, "--resume"))
    assert "nothing to resume" in err


def test_predict_without_texts_or_model(capsys, tmp_path):
    err = _bad(capsys, ["predict", str(tmp_path), "--text", "x"])
    assert "not a tuneforge model directory" in err


def _bert_parameters(model_dir) -> tuple[int, int]:
    """(all, embedding) parameters of a BertModel, counted by hand from its config.json: what `models` must print.
    Embedding = the tensors under embeddings.* (word, position, token-type tables and their LayerNorm)."""
    c = json.loads((model_dir / "config.json").read_text())
    h, inter = c["hidden_size"], c["intermediate_size"]
    embedding = (c["vocab_size"] + c["max_position_embeddings"] + c["type_vocab_size"]) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * inter + inter) + (inter * h + h) + 2 * h  # q k v o, LN, FFN in/out, LN
    return embedding + c["num_hidden_layers"] * layer + h * h + h, embedding  # + the pooler


def _estimate(non_embedding: int, gflops: float) -> float:
    """training/cost.py seconds_per_1k_examples as documented: 6 FLOPs per weight per token, 48 tokens an example,
    at 75% of the measured matmul speed."""
    return 6 * non_embedding * 48 * 1000 / (gflops * 1e9 * 0.75)


def test_models_lists_a_local_directory_with_its_size(capsys, monkeypatch, tmp_path):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)  # wider than the tiny test model, so that its size prints as more than 0.0M
    model_dir = tmp_path / "bert-1m"
    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=512, max_position_embeddings=64)
    model = BertModel(config)
    model.save_pretrained(model_dir, safe_serialization=True)
    total, embedding = _bert_parameters(model_dir)
    assert total == model.num_parameters()
    # a machine of 2 GFLOP/s (test_models_json checks the real measurement): the time printed is exact
    monkeypatch.setattr("tuneforge.training.cost.matmul_flops", lambda precision="fp32", seconds=0.3: 2e9)
    assert main(["models", "--path", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] in ("pre-trained models found (this CPU: 2 GFLOP/s fp32 matmul)",
                                   "pre-trained models found (this CPU: 2 GFLOP/s bf16 matmul)")
    row = next(line for line in out.splitlines() if line.startswith(str(model_dir) + " "))
    seconds = _estimate(total - embedding, 2.0)
    assert 100 < seconds < 1000
    assert row.split()[1:] == ["BertModel", "4", f"{total / 1e6:.1f}M", f"~{seconds:.0f}", "s", "(full", "fine-tune,",
                               "~48", "tokens/example)", str(model_dir.resolve())]


def _long_model_dir(tiny_model_dir, tmp_path):
    """The tiny model under a path far wider than an 80-column table."""
    path = tmp_path / ("a-rather-long-directory-name-" * 3 + "end") / "tiny-bert-with-a-long-name"
    shutil.copytree(tiny_model_dir, path)
    return path


def test_models_piped_prints_whole_references_and_paths(capsys, tiny_model_dir, tmp_path):
    from tuneforge.models.resolve import installed_models

    model = _long_model_dir(tiny_model_dir, tmp_path)
    assert main(["models", "--path", str(model)]) == 0  # capsys's stdout is not a terminal, like `| cat`
    out = capsys.readouterr().out
    assert "\u2026" not in out  # no "..." truncation
    line = [l for l in out.splitlines() if l.startswith(str(model))]  # the reference, whole, first on its line
    assert len(line) == 1 and line[0].endswith(str(model.resolve())) and "BertModel" in line[0]
    for m in installed_models():
        assert any(l.startswith(m["name"] + " ") and l.endswith(m["path"]) for l in out.splitlines()), m


def test_models_in_a_terminal_still_draws_a_table(capsys, monkeypatch, tiny_model_dir):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["models", "--path", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "\u250f" in out and "BertModel" in out  # rich's box corner


def test_models_json(capsys, tiny_model_dir, tmp_path):
    from tuneforge.models.resolve import describe

    model = _long_model_dir(tiny_model_dir, tmp_path)
    assert main(["models", "--path", str(model), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert isinstance(entries, list)
    mine = [e for e in entries if e["reference"] == str(model)]
    assert len(mine) == 1
    e = mine[0]
    assert e["path"] == str(model.resolve())
    assert e["architecture"] == "BertModel" and e["layers"] == 2
    total, embedding = _bert_parameters(model)
    assert e["parameters"] == describe(model)["parameters"] == total
    # the estimate is the documented formula at the GFLOP/s printed (rounded to 0.1; the estimate to 4 digits)
    assert e["machine_gflops"] > 0
    assert e["est_train_seconds_per_1k_examples"] == pytest.approx(_estimate(total - embedding, e["machine_gflops"]),
                                                                   rel=0.05 / e["machine_gflops"] + 1e-3)
    assert e["precision"] in ("fp32", "bf16")


def test_version_prints_tuneforge_torch_and_transformers(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code in (0, None)
    v = importlib.metadata.version
    assert capsys.readouterr().out == f"tuneforge {v('tuneforge')} (torch {v('torch')}, transformers {v('transformers')})\n"
    code = ("import sys; from tuneforge.cli import main\n"
            "try: main(['--version'])\nexcept SystemExit as e: assert e.code in (0, None), e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.endswith("ok\n"), result.stderr


def test_help_does_not_import_torch():
    code = ("import sys; from tuneforge.cli import build_parser; import tuneforge.config;"
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"


def test_json_figures_on_stdout_and_whole_tables_in_a_log(capsys, tmp_path, tiny_llama_dir):
    """Output that is not a terminal (here: captured, as in a log file or CI) keeps every table whole: each figure of
    the closing table (the causal LM's: nine columns, wider than 80) appears with all its digits and no cell is cut
    ("…"). --json prints metrics.json's content on standard output, the progress on standard error."""
    from test_causal_lm_pipeline import _write_jsonl, pair_rows

    data = _write_jsonl(tmp_path / "pairs.jsonl", pair_rows(60))
    args = ["run", "--task", "causal-lm", "--data", str(data), "--model", str(tiny_llama_dir), "--method", "full",
            "--epochs", "1", "--output", str(tmp_path / "out"), "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert json.loads(captured.out) == saved
    for text in (captured.err, (tmp_path / "out" / "run.log").read_text()):
        assert "…" not in text
        table = text[text.index("test split: model vs baselines"):]
        header = next(line for line in table.splitlines() if "perplexity" in line)
        for name in ("loss", "perplexity", "exact_match", "rouge_l", "chrf", "95% CI (rouge_l)"):
            assert name in header
        for name, m in [("fine-tuned model", saved["test"]["model"]), *saved["test"]["baselines"].items()]:
            row = next(line for line in table.splitlines() if name in line)  # one line per row
            for key in ("rouge_l", "chrf", "exact_match"):
                assert f"{m[key]:.4f}" in row, (name, key, row)
            assert f"{m['ci']['low']:.4f}-{m['ci']['high']:.4f}" in row
