"""The model card, `model/README.md`, in the Hugging Face format: a YAML metadata header, then prose
and tables a reader needs before using the model. Built from the run's stored JSON."""
from __future__ import annotations

from pathlib import Path

import yaml


def _model_index(m: dict, name: str, data_hash: str) -> list[dict]:
    test = m["test"]["model"]
    return [{"name": name, "results": [{
        "task": {"type": "text-classification", "name": "Text Classification"},
        "dataset": {"type": "custom", "name": f"test split sha256:{data_hash[:16]}"},
        "metrics": [{"type": "accuracy", "value": round(test["accuracy"], 4)},
                    {"type": "f1", "name": "macro-F1", "value": round(test["macro_f1"], 4), "args": {"average": "macro"}}],
    }]}]


def build_card(out: Path) -> Path:
    from tuneforge.evaluation.report import load_run

    m, data, run, _ = load_run(out)
    key = m["main_metric"]
    test = m["test"]
    model_class = run.get("task", {}).get("model_class", "AutoModelForSequenceClassification")  # runs before the field
    name = out.resolve().name
    meta = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "base_model": run["model"]["reference"],
        "tags": ["tuneforge", "text-classification"] + (["multi-label"] if data["multi_label"] else []),
        "datasets": [f"sha256:{f['sha256']}" for f in data["files"]],
        "metrics": ["accuracy", "f1"],
        "model-index": _model_index(m, name, data["test_sha256"]),
        "tuneforge": {"promoted": m.get("promoted"), "test_split_sha256": data["test_sha256"],
                      "labels": m["labels"], "main_metric": key},
    }
    rows = [f"| fine-tuned model | {test['model']['accuracy']:.4f} | {test['model']['macro_f1']:.4f} | "
            + (f"{test['model']['ci']['low']:.4f}-{test['model']['ci']['high']:.4f} |" if test["model"].get("ci") else "- |")]
    rows += [f"| {n} (baseline) | {b['accuracy']:.4f} | {b['macro_f1']:.4f} | "
             + (f"{b['ci']['low']:.4f}-{b['ci']['high']:.4f} |" if b.get("ci") else "- |") for n, b in test["baselines"].items()]
    splits = data["splits"]
    slices = []
    for col, s in (m.get("slices") or {}).items():
        groups = ", ".join(f"{g} {v[key]:.3f} (n={v['n']})" for g, v in s["groups"].items())
        slices.append(f"- **{col}**: {groups}; largest gap {s['largest_gap']:.3f}" + (" (above the warning threshold)" if s["warning"] else ""))
    removed = ", ".join(f"{k}: {v}" for k, v in data["removed_counts"].items()) or "none"
    body = f"""
# {name}

A {'multi-label' if data['multi_label'] else 'single-label'} text classifier fine-tuned by tuneforge from
`{run['model']['reference']}` ({run['model']['architecture']}, {run['model']['parameters'] / 1e6:.1f}M parameters).
Labels: {', '.join(f'`{lab}`' for lab in m['labels'])}.

## Intended use
Classifying texts like those it was trained on (see the data summary) into the labels above. It is
not meant for other languages, domains or label sets, nor for decisions about people without a
human review: check the slice results and limitations first.

**Promotion:** {'promoted' if m.get('promoted') else 'NOT promoted'}: {m.get('promotion_reason', '')}.

## Training data
{splits['train']['rows']} training, {splits['val']['rows']} validation and {splits['test']['rows']} test rows
(test split sha256 `{data['test_sha256'][:16]}`, {'carved from the data, stratified' if data['test_source'] == 'carved' else 'a separate file'}).
Rows removed by cleaning: {removed}. Class counts in training: {', '.join(f'{c} {n}' for c, n in splits['train']['class_counts'].items())}.

## Results on the test split
| | accuracy | macro-F1 | 95% CI ({key}) |
|---|---|---|---|
{chr(10).join(rows)}

{('## Slice results' + chr(10) + chr(10).join(slices)) if slices else ''}

## Limitations
- Scores hold for data drawn like the test split; expect lower scores on shifted inputs.
- Inputs are truncated to the model's maximum length used in training.
- Probabilities are {'reasonably' if m.get('calibration', {}).get('ece', 1) < 0.05 else 'not well'} calibrated
  (expected calibration error {m.get('calibration', {}).get('ece', float('nan')):.3f}).
- Label noise in the training data (see `audit.json` in the run) bounds what the model can learn.

## How to load
```python
from transformers import {model_class}, AutoTokenizer
model = {model_class}.from_pretrained("PATH/TO/model")
tokenizer = AutoTokenizer.from_pretrained("PATH/TO/model")
```
or `tuneforge predict RUN_DIR --text "..."`.
"""
    path = out / "model" / "README.md"
    path.write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body, encoding="utf-8")
    return path
