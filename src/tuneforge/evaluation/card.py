"""The model card, `model/README.md`, in the Hugging Face format: a YAML metadata header, then prose
and tables a reader needs before using the model. Built from the run's stored JSON."""
from __future__ import annotations

import json
from pathlib import Path

import yaml


def _model_index(m: dict, name: str, data_hash: str, spec) -> list[dict]:
    """The Hub's model-index: the test metrics the task's spec maps to Hub metric entries (its card_metrics)."""
    test = m["test"]["model"]
    return [{"name": name, "results": [{
        "task": {"type": spec.pipeline_tag, "name": spec.pipeline_tag.replace("-", " ").title()},
        "dataset": {"type": "custom", "name": f"test split sha256:{data_hash[:16]}"},
        "metrics": [{**entry, "value": round(test[k], 4)} for k, entry in spec.card_metrics.items()
                    if isinstance(test.get(k), (int, float))],
    }]}]


def _metadata(m: dict, data: dict, run: dict, spec, name: str, variant: str | None) -> dict:
    """The card's YAML header: what the Hub reads (pipeline tag, base model, metrics, model-index)."""
    return {
        "library_name": "transformers",
        "pipeline_tag": spec.pipeline_tag,
        "base_model": run["model"]["reference"],
        "tags": ["tuneforge", spec.name] + ([variant] if variant else []),
        "datasets": [f"sha256:{f['sha256']}" for f in data["files"]],
        "metrics": sorted({e["type"] for k, e in spec.card_metrics.items()
                           if isinstance(m["test"]["model"].get(k), (int, float))}),
        "model-index": _model_index(m, name, data["test_sha256"], spec),
        "tuneforge": {"promoted": m.get("promoted"), "test_split_sha256": data["test_sha256"],
                      "labels": m["labels"], "main_metric": m["main_metric"]},
    }


def build_card(out: Path, run: dict | None = None) -> Path:
    """OUT/model/README.md from the run's stored JSON (`run`: the run info of one finishing, before run.json)."""
    from tuneforge import artifacts
    from tuneforge.evaluation.report import load_run

    m, data, run, _ = load_run(out, run)
    key = m["main_metric"]
    from tuneforge.artifacts import run_task_type
    from tuneforge.tasks import get_spec
    from tuneforge.tasks.behaviour import get_task

    task_type = run_task_type(out)
    task, spec = get_task(task_type), get_spec(task_type)
    facts = task.card_facts(data, json.loads((out / "model" / "config.json").read_text()).get("tuneforge", {}))
    variant = facts.get("variant")
    model_class = task.model_class
    name = out.resolve().name
    meta = _metadata(m, data, run, spec, name, variant)
    header, cells = task.summary_rows(m)
    rows = [f"| {row[0]}{'' if k == 0 else ' (baseline)'} | " + " | ".join(row[1:]) + " |" for k, row in enumerate(cells)]
    splits = data["splits"]
    slices = []
    for col, s in (m.get("slices") or {}).items():
        groups = ", ".join(f"{g} {v[key]:.3f} (n={v['n']})" for g, v in s["groups"].items())
        slices.append(f"- **{col}**: {groups}; largest gap {s['largest_gap']:.3f}" + (" (above the warning threshold)" if s["warning"] else ""))
    labels_line = f"Labels: {', '.join(f'`{lab}`' for lab in m['labels'])}." if m["labels"] else ""
    removed = ", ".join(f"{k}: {v}" for k, v in data["removed_counts"].items()) or "none"
    limits = "- " + facts["inputs"]
    if m.get("calibration"):
        ece = m["calibration"]["ece"]
        limits += f"\n- Probabilities are {'reasonably' if ece < 0.05 else 'not well'} calibrated (expected calibration error {ece:.3f})."
    body = f"""
# {name}

A {task_type.replace('-', ' ')} model{f' ({variant})' if variant else ''} fine-tuned by tuneforge from
`{run['model']['reference']}` ({run['model']['architecture']}, {run['model']['parameters'] / 1e6:.1f}M parameters).
{labels_line}

## Intended use
{task.intended_use(m)}

**Promotion:** {'promoted' if m.get('promoted') else 'NOT promoted'}: {m.get('promotion_reason', '')}.

## Training data
{splits['train']['rows']} training, {splits['val']['rows']} validation and {splits['test']['rows']} test rows
(test split sha256 `{data['test_sha256'][:16]}`, {'carved from the data, stratified' if data['test_source'] == 'carved' else 'a separate file'}).
Rows removed by cleaning: {removed}. {spec.counted.capitalize()} in training: {', '.join(f'{c} {n}' for c, n in splits['train']['class_counts'].items())}.

## Results on the test split
| | {' | '.join(header)} |
|{'---|' * (len(header) + 1)}
{chr(10).join(rows)}

{('## Slice results' + chr(10) + chr(10).join(slices)) if slices else ''}

## Limitations
- Scores hold for data drawn like the test split; expect lower scores on shifted inputs.
{limits}
- Label noise in the training data (see `audit.json` in the run) bounds what the model can learn.

## How to load
{facts["load"]}
"""
    path = out / "model" / "README.md"
    artifacts.write_text(path, "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body)
    return path
