"""What a run prints and keeps (OUTPUT/run.log), and which model files it refuses to load (pickle, a folder's own code)."""
import json
import logging
import shutil
import warnings

from tuneforge import pipeline
from tuneforge.cli import main
from tuneforge.models.resolve import check_model_files

from conftest import make_rows


def _argv(tmp_path, data, model, *extra):
    return ["run", "--data", str(data), "--text-column", "text", "--label-column", "label",
            "--model", str(model), "--output", str(tmp_path / "out"), "--epochs", "1", *extra]


def test_library_warnings_go_to_run_log_and_one_line_reaches_the_terminal(capsys, tmp_path, write_csv, tiny_model_dir,
                                                                           monkeypatch):
    from sklearn.exceptions import ConvergenceWarning

    original = pipeline.check_audit

    def noisy(report):  # what scikit-learn and transformers do during a real run, three times over
        for i in range(3):
            warnings.warn_explicit(f"lbfgs failed to converge (status=1) #{i}", ConvergenceWarning, "sklearn/linear.py", 100 + i)
        logging.getLogger("transformers.modeling_utils").warning("Some weights were newly initialized")
        return original(report)

    monkeypatch.setattr(pipeline, "check_audit", noisy)
    assert main(_argv(tmp_path, write_csv(make_rows(60)), tiny_model_dir)) == 0
    captured = capsys.readouterr()
    terminal = captured.out + captured.err
    assert "lbfgs failed to converge" not in terminal and "newly initialized" not in terminal
    summary = [line for line in terminal.splitlines() if "library warning" in line]
    assert summary == [f"3 library warnings (ConvergenceWarning x3): {tmp_path / 'out' / 'run.log'}"]
    log = (tmp_path / "out" / "run.log").read_text()
    assert all(f"lbfgs failed to converge (status=1) #{i}" in log for i in range(3))
    assert "transformers.modeling_utils: Some weights were newly initialized" in log
    printed = [line for line in captured.out.splitlines() if line.startswith("data ")]
    assert printed and printed[0] in log  # what the terminal showed is kept too


def test_a_quiet_run_adds_no_warning_line_and_a_bad_input_leaves_no_log(capsys, tmp_path, write_csv, tiny_model_dir):
    assert main(_argv(tmp_path, tmp_path / "missing.csv", tiny_model_dir)) == 2
    assert not (tmp_path / "out").exists()
    assert main(_argv(tmp_path, write_csv(make_rows(60)), tiny_model_dir)) == 0
    assert "library warning" not in capsys.readouterr().err
    assert "output" in (tmp_path / "out" / "run.log").read_text()


def _copy(model_dir, tmp_path, name):
    path = tmp_path / name
    shutil.copytree(model_dir, path)
    return path


def test_a_model_folder_with_only_pickle_weights_is_refused(capsys, tmp_path, write_csv, tiny_model_dir):
    model = _copy(tiny_model_dir, tmp_path, "pickled")
    (model / "model.safetensors").rename(model / "pytorch_model.bin")  # never opened: the name is enough to refuse
    assert main(_argv(tmp_path, write_csv(make_rows(60)), model)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "only pickle weights (pytorch_model.bin)" in err and "safe_serialization=True" in err
    assert not (tmp_path / "out").exists()


def test_pickle_files_beside_safetensors_are_named_and_never_loaded(tmp_path, tiny_model_dir):
    model = _copy(tiny_model_dir, tmp_path, "both")
    (model / "pytorch_model.bin").write_bytes(b"not even a pickle: loading it would fail loudly")
    (model / "optimizer.pt").write_bytes(b"x")
    assert check_model_files(model, trust_remote_code=False) == [
        f"ignored optimizer.pt, pytorch_model.bin in {model}: pickle files are never loaded, only safetensors"]
    assert check_model_files(tiny_model_dir, trust_remote_code=False) == []


CUSTOM_CODE = '''
from transformers import BertForSequenceClassification


class TinyCustomClassifier(BertForSequenceClassification):
    """Stands for a model architecture shipped as code in the model folder."""
'''


def test_a_folder_shipping_code_is_refused_unless_trusted_and_then_said(capsys, tmp_path, write_csv, tiny_model_dir):
    model = _copy(tiny_model_dir, tmp_path, "custom")
    (model / "modeling_tiny.py").write_text(CUSTOM_CODE)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_tiny.TinyCustomClassifier"}
    (model / "config.json").write_text(json.dumps(config))

    assert main(_argv(tmp_path, write_csv(make_rows(60)), model)) == 2
    err = capsys.readouterr().err
    assert "ships its own Python code (modeling_tiny.py" in err and "model.trust_remote_code: true" in err
    assert not (tmp_path / "out").exists()

    assert check_model_files(model, trust_remote_code=True) == [
        f"model.trust_remote_code is on: running the code shipped in {model} (modeling_tiny.py)"]
    from tuneforge.tasks.classification.labels import LabelSpace
    from tuneforge.tasks.classification.model import load_classifier

    space = LabelSpace(("neg", "pos"), False, 0.5)
    assert type(load_classifier(model, space, 0, trust_remote_code=True)).__name__ == "TinyCustomClassifier"
    # without the flag transformers takes its own class for the model type and leaves the folder's code alone
    assert type(load_classifier(model, space, 0)).__name__ == "BertForSequenceClassification"
