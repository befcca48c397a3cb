"""`tuneforge export OUT --format onnx|gguf [--quantize ...]`: a finished run's model in the formats users deploy
with, written under OUT/export/<format>/ and checked against the PyTorch model on the run's own test split.

- onnx (the encoders: text, token and image classification): model.onnx with free batch and sequence axes, the
  tokenizer / preprocessor files beside it; its outputs must match the PyTorch model's within ONNX_MAX_ABS_DIFF and
  give the same labels on at least ONNX_MIN_AGREEMENT of the test rows. `--quantize int8` adds model_int8.onnx
  (dynamic int8 weights), its agreement reported. `tuneforge serve OUT --runtime onnx|onnx-int8` serves them.
- gguf (the causal LM): model-<type>.gguf (f16 by default, bf16 or q8_0) with its tokenizer and chat template, and a
  Modelfile for Ollama; loaded back with transformers' GGUF loader, its log-probabilities on the test prompts (the
  next token's, and each prompt token's) are compared with the safetensors model's: the same top next token (or a
  near tie, `near_tie_flips`) on at least GGUF_MIN_TOP1 of them, and differences within GGUF_MAX_RELATIVE_DIFF of the
  largest.

Which formats a task has is its spec's `export_formats`; the task gives the example inputs (`onnx_inputs`) and its
outputs per test row (`export_outputs`). Each export is recorded in run.json's `exports` (files and sizes, the
check's figures, the seconds taken) and in OUT/export/<format>/export.json.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from tuneforge import artifacts
from tuneforge.errors import ConfigError, OutputError, TuneforgeError

FORMATS = ("onnx", "gguf")
QUANTIZE = {"onnx": ("int8",), "gguf": ("f16", "bf16", "q8_0")}
ONNX_MAX_ABS_DIFF = 1e-3
ONNX_MIN_AGREEMENT = 0.999
GGUF_MIN_TOP1 = 0.95  # f16 and bf16 give 1.0 on the demo; q8_0 may flip a near tie
# max |log-prob difference| / max |log-prob| per type; a wrong q/k layout (tiny test Llama) 5%
GGUF_MAX_RELATIVE_DIFF = {"f16": 0.01, "bf16": 0.03, "q8_0": 0.15}
RUNTIMES = {"onnx": "model.onnx", "onnx-int8": "model_int8.onnx"}  # serve --runtime -> the file it serves
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx")


class ExportCheckError(TuneforgeError):
    """The exported model does not give the PyTorch model's outputs."""


def export_run(run_dir: Path, fmt: str, quantize: str | None, console) -> dict:
    """Export the finished run in `run_dir`; returns the record kept in run.json's `exports[fmt]`."""
    from tuneforge.config import load_config
    from tuneforge.tasks import get_spec
    from tuneforge.tasks.behaviour import get_task

    run_dir = Path(run_dir)
    if not (run_dir / artifacts.FINISHED_MARKER).is_file() or not (run_dir / "model" / "model.safetensors").is_file():
        raise OutputError(f"{run_dir} holds no finished run (run.json and model/model.safetensors)",
                          fix="pass the output directory of a finished `tuneforge run`")
    cfg = load_config(run_dir / "config.yaml")
    spec, task = get_spec(cfg.task.type), get_task(cfg.task.type)
    if fmt not in spec.export_formats:
        raise ConfigError(f"--format {fmt}: a {spec.name} model exports to "
                          f"{', '.join(spec.export_formats) or 'no other format'} ",
                          fix=f"use --format {spec.export_formats[0]}" if spec.export_formats else
                          "load OUT/model with transformers (safetensors)")
    if quantize is not None and quantize not in QUANTIZE[fmt]:
        raise ConfigError(f"--quantize {quantize} is not a {fmt} option", fix=f"use one of {', '.join(QUANTIZE[fmt])}")
    run_info = json.loads((run_dir / artifacts.FINISHED_MARKER).read_text())
    t0 = time.perf_counter()
    test = _test_split(task, cfg, run_info, run_dir)
    console.print(f"[bold]export[/] {fmt}: checking on the run's {len(test)} test rows")
    dest = run_dir / "export" / fmt
    with artifacts.staged_dir(dest) as staging:
        staging.mkdir(parents=True)
        record = (_onnx if fmt == "onnx" else _gguf)(task, run_dir, staging, test, quantize, cfg, run_info)
        record["model_sha256"] = model_hash(run_dir / "model")
        record["files"] = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
        record["seconds"] = round(time.perf_counter() - t0, 2)
        artifacts.write_json(staging / "export.json", record)
    run_info.setdefault("exports", {})[fmt] = record
    artifacts.write_json(run_dir / artifacts.FINISHED_MARKER, run_info)
    return record


def _test_split(task, cfg, run_info: dict, run_dir: Path):
    """The run's test split, read again from its data (the check runs on the rows the run was tested on)."""
    data = task.prepare(cfg)
    got = {k: v["sha256"] for k, v in data.report["splits"].items()}
    if got.get("test") != run_info["data"]["splits"].get("test"):
        raise OutputError(f"the data in {cfg.data.path} no longer gives the run's test split (content hash differs)",
                          fix=f"export with the data the run in {run_dir} was trained on")
    return data.splits.test


def model_hash(model_dir: Path) -> str:
    """sha256 of the model's weights (model.safetensors), hex[:16]: which model an export was made from."""
    digest = hashlib.sha256()
    with open(model_dir / "model.safetensors", "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()[:16]


def agreement(ref: list, ref_labels: list, got: list, labels: list) -> dict:
    """Max |difference| of the per-row outputs (and relative to the largest output), the share of rows whose labels
    are the same."""
    diff = max((float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))
                for a, b in zip(ref, got) if np.size(a)), default=0.0)
    same = sum(1 for a, b in zip(ref_labels, labels) if a == b)
    scale = max((float(np.max(np.abs(a))) for a in ref if np.size(a)), default=0.0)
    return {"rows": len(ref), "max_abs_diff": diff, "relative_diff": diff / scale if scale else 0.0,
            "label_agreement": same / max(len(ref), 1)}


def near_tie_flips(ref: list, ref_labels: list, got: list, labels: list) -> int:
    """Rows whose top next token differs, but by a tie within the export's own error: the reference model's lead of
    its pick over the export's is at most twice the row's typical error (the 99th percentile of its |log-probability
    differences|: a lead of d flips only when the two errors differ by more than d). q8_0 rounds a 0.01-nat lead
    away; no format keeps an order finer than its error. A row's first entries are the next-token log-probabilities,
    indexed by token id."""
    ties = 0
    for a, top_a, b, top_b in zip(ref, ref_labels, got, labels):
        if top_a != top_b:
            a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            ties += int(a[top_a] - a[top_b] <= 2 * float(np.percentile(np.abs(a - b), 99)))
    return ties


def _gold(labels: list, test) -> float:
    """The share of test rows whose predicted label(s) are the gold ones (single-label classification: accuracy;
    tagging: sentences tagged wholly right): what int8 costs, in the task's own terms."""
    gold = [list(g) if isinstance(g, (list, tuple)) else g for g in test.labels]
    got = [list(x) if isinstance(x, (list, tuple)) else x for x in labels]
    return sum(1 for a, b in zip(got, gold) if a == b) / max(len(gold), 1)


def _copy_side_files(model_dir: Path, dest: Path) -> None:
    """config.json, tokenizer and preprocessor files, the model card: everything but the weights."""
    for p in model_dir.iterdir():
        if p.is_file() and not p.name.endswith(_WEIGHTS):
            shutil.copy2(p, dest / p.name)


def _onnx(task, run_dir: Path, staging: Path, test, quantize: str | None, cfg, run_info: dict) -> dict:
    from tuneforge.models.onnx import OnnxModel, export_onnx, quantize_int8

    predictor = task.load_predictor(run_dir / "model", "cpu", "fp32")
    t = time.perf_counter()
    example, dynamic = task.onnx_inputs(predictor)
    export_onnx(predictor.model, example, dynamic, staging / RUNTIMES["onnx"])
    seconds_export = time.perf_counter() - t
    batch = cfg.eval.batch_size
    t = time.perf_counter()
    ref, ref_labels = task.export_outputs(predictor, test, batch)
    seconds_torch = time.perf_counter() - t
    torch_model = predictor.model
    predictor.model = OnnxModel(staging / RUNTIMES["onnx"], config=torch_model.config)
    t = time.perf_counter()
    got, labels = task.export_outputs(predictor, test, batch)
    check = agreement(ref, ref_labels, got, labels) | {"seconds_torch": round(seconds_torch, 3),
                                                      "seconds_onnx": round(time.perf_counter() - t, 3),
                                                      "gold_agreement_torch": _gold(ref_labels, test)}
    check["passed"] = check["max_abs_diff"] <= ONNX_MAX_ABS_DIFF and check["label_agreement"] >= ONNX_MIN_AGREEMENT
    if not check["passed"]:
        raise ExportCheckError(f"the ONNX graph differs from the PyTorch model on the test split: max |difference| "
                               f"{check['max_abs_diff']:.2e} (limit {ONNX_MAX_ABS_DIFF:g}), the same labels on "
                               f"{check['label_agreement']:.2%} of {check['rows']} rows (at least {ONNX_MIN_AGREEMENT:.1%})",
                               fix="report the model's architecture; nothing was written to OUT/export/onnx")
    record = {"format": "onnx", "file": RUNTIMES["onnx"], "seconds_export": round(seconds_export, 2), "check": check,
              "inputs": {k: list(v) for k, v in ((n, [dynamic.get(n, {}).get(i, d) for i, d in enumerate(x.shape)])
                                                 for n, x in example.items())}}
    if quantize == "int8":
        quantize_int8(staging / RUNTIMES["onnx"], staging / RUNTIMES["onnx-int8"])
        predictor.model = OnnxModel(staging / RUNTIMES["onnx-int8"], config=torch_model.config)
        t = time.perf_counter()
        got, labels = task.export_outputs(predictor, test, batch)
        record["int8"] = agreement(ref, ref_labels, got, labels) | {"file": RUNTIMES["onnx-int8"],
                                                                   "seconds_onnx": round(time.perf_counter() - t, 3),
                                                                   "gold_agreement": _gold(labels, test)}
    _copy_side_files(run_dir / "model", staging)
    return record


def _gguf(task, run_dir: Path, staging: Path, test, quantize: str | None, cfg, run_info: dict) -> dict:
    from tuneforge.models.gguf import load_gguf_model, source_pre_tokenizer
    from tuneforge.models.gguf_write import write_gguf

    out_type = quantize or "f16"
    name = f"model-{out_type}.gguf"
    t = time.perf_counter()
    converted = (run_info.get("model") or {}).get("converted") or {}
    written = write_gguf(run_dir / "model", staging / name, out_type, name=Path(cfg.model.name).name,
                         pre_tokenizer=source_pre_tokenizer(converted.get("source")))
    seconds_write = time.perf_counter() - t
    predictor = task.load_predictor(run_dir / "model", "cpu", "fp32")
    batch = cfg.eval.batch_size
    ref, ref_labels = task.export_outputs(predictor, test, batch)
    t = time.perf_counter()
    predictor.model = load_gguf_model(staging / name)
    seconds_load = time.perf_counter() - t
    got, labels = task.export_outputs(predictor, test, batch)
    check = agreement(ref, ref_labels, got, labels) | {"seconds_load": round(seconds_load, 2)}
    check["top1_agreement"] = check.pop("label_agreement")
    check["top1_near_ties"] = near_tie_flips(ref, ref_labels, got, labels)
    agreeing = check["top1_agreement"] + check["top1_near_ties"] / max(check["rows"], 1)
    limit = GGUF_MAX_RELATIVE_DIFF[out_type]
    check["passed"] = agreeing >= GGUF_MIN_TOP1 and check["relative_diff"] <= limit
    if not check["passed"]:
        raise ExportCheckError(f"the GGUF loaded back picks the model's next token (or one tied with it within its "
                               f"error) on {agreeing:.1%} of "
                               f"{check['rows']} test prompts (at least {GGUF_MIN_TOP1:.0%}), its log-probabilities differ by up to "
                               f"{check['relative_diff']:.1%} of the largest (at most {limit:.0%} for {out_type})",
                               fix="report the model's architecture; nothing was written")
    stops = [predictor.tokenizer.convert_ids_to_tokens(i) for i in predictor.stops]
    system = predictor.settings.get("system_prompt")  # the run's own system prompt, as `serve` prepends it
    (staging / "Modelfile").write_text(f"FROM ./{name}\n" + "".join(f'PARAMETER stop "{s}"\n' for s in stops)
                                       + "PARAMETER temperature 0\n" + (f'SYSTEM """{system}"""\n' if system else ""))
    return {"format": "gguf", "file": name, "type": out_type, **{k: written[k] for k in ("architecture", "tensors")},
            "seconds_write": round(seconds_write, 2), "check": check}


def onnx_model_path(run_dir: Path, runtime: str) -> Path:
    """The exported file `serve --runtime` serves, checked to be of the run's current model."""
    path = Path(run_dir) / "export" / "onnx" / RUNTIMES[runtime]
    record_path = path.parent / "export.json"
    flag = " --quantize int8" if runtime == "onnx-int8" else ""
    if not path.is_file() or not record_path.is_file():
        raise OutputError(f"{path} does not exist: --runtime {runtime} serves the run's ONNX export",
                          fix=f"run `tuneforge export {run_dir} --format onnx{flag}` first")
    if json.loads(record_path.read_text()).get("model_sha256") != model_hash(Path(run_dir) / "model"):
        raise OutputError(f"{path} was exported from another model than {run_dir}/model (the run was trained again)",
                          fix=f"run `tuneforge export {run_dir} --format onnx{flag}` again")
    return path
