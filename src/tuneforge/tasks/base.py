"""What most tasks do alike, as defaults a task inherits and overrides where it differs (the causal LM
measures its own lengths, picks its own max_length, LoRA targets, loss, selection and search space, adds to the
export, and mounts the OpenAI API when served)."""
from __future__ import annotations

import math
from pathlib import Path


class TaskDefaults:
    def resolve_model(self, ref: str) -> tuple[Path, dict | None]:
        """(the model directory model.name names, what a conversion took or None): a directory, a .gguf file or an
        installed package (models/resolve.py); a task whose models ship otherwise converts them here."""
        from tuneforge.models.resolve import resolve_model_info

        return resolve_model_info(ref)

    def lora_head(self) -> list[str] | None:
        """Modules LoRA trains in full beside the adapters, for a task peft has no task type for (its new head)."""
        return None

    def parse_upload(self, body: bytes, content_type: str) -> dict | None:
        """A /v1/predict body that is not JSON (a multipart upload) as the task's request, or None: read as JSON."""
        return None

    def token_lengths(self, cfg, tokenizer, data) -> dict:
        """Tokens per row of each split before truncation: what the audit and max_length: null measure."""
        from tuneforge.models.infer import token_lengths

        return {name: token_lengths(tokenizer, ex.texts) for name, ex in data.splits.items()}

    def max_length(self, cfg, train_lengths, tokenizer, model_dir: Path) -> tuple[int, str]:
        from tuneforge.models.infer import resolve_max_length

        return resolve_max_length(cfg.model.max_length, train_lengths, tokenizer, model_dir)

    def lora_targets(self):
        return None  # peft's default for the architecture

    def training_loss(self, cfg):
        return None  # the model's own loss

    def before_training(self, cfg, label_space, ids: dict, y: dict, model, pad_id: int, precision: str) -> None:
        """Work on the pre-trained model just before training changes it (on every process, for every training of a
        search): e.g. the reference log-probabilities preference tuning measures its rewards from."""
        return None

    def trained_baselines(self, cfg, label_space, ids: dict, y: dict, max_length: int) -> dict:
        """Baselines that are trainings themselves: name -> (label space, ids, targets) of a variant of the data that
        the pipeline trains with this task's hooks and cfg.train, then hands to `score_trained_baseline`."""
        return {}

    def score_trained_baseline(self, cfg, name: str, label_space, splits, y: dict, model, pad_id: int) -> dict:
        """A trained baseline's test outputs, as `baselines` returns them (kept in baselines.json for --resume)."""
        raise NotImplementedError(f"{self.name} has no trained baseline {name}")

    def selection(self, cfg) -> tuple[str, str]:
        """The validation key that picks the best step, and whether higher or lower is better."""
        return f"val_{cfg.eval.metric}", "max"

    def search_space(self, cfg, n_layers: int | None, epochs: float | None = None) -> dict:
        """What `tuneforge tune` searches when the config has no tune.space: dotted key -> {low, high, log, step}
        or a list of choices. Ranges are widened to hold the config's own values (trial 0 runs them). `epochs`:
        the passes the run itself would make (train.epochs, or resolved from the data's size)."""
        t = cfg.train
        space = {
            # log-uniform, a factor of 5 either way of the config's rate (by default the method's)
            "train.learning_rate": {"low": t.learning_rate / 5, "high": min(t.learning_rate * 5, 0.5), "log": True},
            "train.epochs": epochs_range(epochs, t.max_auto_epochs),
            "train.weight_decay": [0.0, 0.01, 0.1],
            "train.warmup_ratio": [0.0, 0.06, 0.1],
        }
        if t.method == "frozen" and n_layers and n_layers > 1:
            space["train.frozen_layers"] = {"low": 0, "high": n_layers - 1}
        if t.method == "lora":
            space["train.lora.r"] = [8, 16, 32]
        return space

    def export(self, cfg, model_dir: Path, tokenizer, label_space) -> None:
        """Anything the task adds to the exported model directory."""
        return None

    def onnx_inputs(self, predictor) -> tuple[dict, dict]:
        """(example inputs of the ONNX graph, their free axes) for `tuneforge export --format onnx`: by default a
        text encoder's token ids and attention mask, batch and sequence free."""
        import torch

        vocab = int(predictor.model.config.vocab_size)
        ids = torch.randint(min(5, vocab - 1), vocab, (2, 16), generator=torch.Generator().manual_seed(0))
        axes = {0: "batch", 1: "sequence"}
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, {"input_ids": axes, "attention_mask": axes}

    def export_outputs(self, predictor, test, batch_size: int) -> tuple[list, list]:
        """(the model's raw output per test row, its label(s) per row) through `predictor.model`, for an export's
        check (export.py compares them between the PyTorch model and the exported one)."""
        raise NotImplementedError(f"{self.name} has no export check")

    def test_subset(self, splits, y: dict, baselines: dict, keep: list[int]) -> tuple[object, dict, dict]:
        """(splits, targets, baseline outputs) with the test split cut to its rows `keep` (positions in splits.test):
        what `evaluate` needs to score those rows only (audit.leakage: allow scores the test rows not in training).
        Per-row values (arrays, lists and dataclasses of them, dicts of those) are taken at `keep`."""
        import dataclasses

        n = len(splits.test)
        cut = dataclasses.replace(splits, test=splits.test.subset(keep))
        return cut, {**y, "test": take(y["test"], keep, n)}, take(baselines, keep, n)

    def card_facts(self, data_report: dict, model_settings: dict) -> dict:
        """What the model card says of this model beyond its metrics: `variant` (a word after the task's name, or
        None) and `inputs` (how long inputs are handled)."""
        from tuneforge.tasks import get_spec

        flag = get_spec(self.name).input
        load = (f"```python\nfrom transformers import {self.model_class}, AutoTokenizer\n"
                f"model = {self.model_class}.from_pretrained(\"PATH/TO/model\")\n"
                "tokenizer = AutoTokenizer.from_pretrained(\"PATH/TO/model\")\n```\n"
                f"or `tuneforge predict RUN_DIR --{flag} \"...\"`.")
        return {"variant": None, "inputs": "Inputs are truncated to the model's maximum length used in training.",
                "load": load}

    def load_hint(self, model_dir: Path) -> str:
        """One line on how to load the exported model outside tuneforge (the run's last console line)."""
        return f"{self.model_class}.from_pretrained('{model_dir}')"

    # --- what a prediction reads: texts, by default ---
    def read_inputs(self, values: list[str], path: Path | None, column: str | None, run_dir: Path) -> list[str]:
        """`tuneforge predict`'s inputs: the texts given as flags, then those of `path`: a .txt file (one per line), or
        a CSV/JSONL/Parquet file's `column` (default: the run's data.text_column)."""
        from tuneforge.errors import DataError

        texts = list(values)
        if path is not None and path.suffix == ".txt":
            if not path.is_file():
                raise DataError("file does not exist", path=path, fix="check the --input path")
            try:
                texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            except UnicodeDecodeError as err:
                line = path.read_bytes().count(b"\n", 0, err.start)
                raise DataError(f"text is not valid utf-8 (line {line + 1})", path=path, row=line,
                                fix="re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
        elif path is not None:
            from tuneforge.data.load import read_table

            column = column or run_data_setting(run_dir, "text_column") or "text"
            df = read_table(path)
            if column not in df.columns:
                raise DataError(f"text column '{column}' not found; the columns are: {', '.join(map(str, df.columns))}",
                                path=path, column=column, fix="pass --text-column")
            texts += [str(t) for t in df[column].tolist()]
        if not texts:
            raise DataError("no texts to predict", fix='pass --text "..." or --input FILE')
        return texts

    def check_inputs(self, items: list[str], settings) -> str | None:
        """Why a /v1/predict request's inputs are refused (a 422), or None: a text over serve --max-chars."""
        too_long = [i for i, t in enumerate(items) if len(t) > settings.max_chars]
        if too_long:
            return f"text {too_long[0]} is over the limit of {settings.max_chars} characters"
        return None

    def input_size(self, item: str) -> int:
        """An input's size as the request log keeps it and the drift monitor bins it (the `length` signal):
        characters of a text."""
        return len(item)

    def measure_input(self, item) -> dict[str, float]:
        """The input's values of the spec's `input_measures` (what drift watches besides its size): none for a text."""
        return {}

    def mount_routes(self, app, ctx) -> None:
        """Routes the task adds to the server beside /v1/predict (ctx: serving.context.ServeContext)."""
        return None

    # --- training batches: the loop feeds the model what this returns, whatever the targets' shape ---
    def collate(self, examples: list[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict:
        """One training batch (CPU tensors; the loop moves them) from its rows' encoded examples, as
        `training.loop.TrainData.examples` gives them: {"input_ids": [...], "labels": ...} per row.

        input_ids are padded with `pad_id` to the widest row, rounded up to `pad_to_multiple_of` (the loop's cost
        estimate counts those widths), beside their attention mask. labels are stacked where a row has one numpy
        value (a class id, a multi-hot row), or padded with -100, the label the loss ignores, to the inputs' width
        where a row has a list (one per input token). A task whose rows hold more (packed positions) or whose targets
        are shaped otherwise (decoder labels of their own length, image class ids beside pixel values) overrides this."""
        import numpy as np
        import torch

        from tuneforge.models.infer import collate

        extra = sorted(set(examples[0]) - {"input_ids", "labels"})
        if extra:
            raise TypeError(f"the default collate reads input_ids and labels, not {extra}: the task must override collate")
        batch = collate([e["input_ids"] for e in examples], pad_id, multiple=pad_to_multiple_of)
        targets = [e["labels"] for e in examples]
        if isinstance(targets[0], (list, tuple)):
            labels = torch.full(batch["input_ids"].shape, -100, dtype=torch.long)
            for r, row in enumerate(targets):
                labels[r, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            batch["labels"] = labels
        else:
            batch["labels"] = torch.from_numpy(np.stack(targets))
        return batch


def metric_rows(metrics: dict, keys: list[str]) -> tuple[list[str], list[list[str]]]:
    """The console's test table for metrics.json: the model and each baseline, `keys` to 4 decimals ("-" where one
    has none), then the 95% CI of the main metric."""
    rows = []
    for name, m in [("fine-tuned model", metrics["test"]["model"])] + list(metrics["test"]["baselines"].items()):
        ci = m.get("ci")
        rows.append([name] + [f"{m[k]:.4f}" if m.get(k) is not None else "-" for k in keys]
                    + [f"{ci['low']:.4f}-{ci['high']:.4f}" if ci else "-"])
    return keys + [f"95% CI ({metrics['main_metric']})"], rows


def run_data_setting(run_dir: Path, key: str):
    """data.`key` of the run's config.yaml in `run_dir` (None when the run has none)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    return (yaml.safe_load(path.read_text()).get("data") or {}).get(key) if path.is_file() else None


def epochs_range(epochs: float | None, max_auto_epochs: float) -> dict:
    """Half to twice the run's own passes (at least 1 to 2, at most max_auto_epochs unless the run's own is more):
    the search weighs a shorter or longer schedule than the default without trials of many times its cost (the
    run's epochs aim at ~600 steps already). Unknown: 1 to max_auto_epochs."""
    if epochs is None:
        return {"low": 1, "high": max(1, int(max_auto_epochs))}
    low = max(1, int(epochs // 2))
    high = max(low + 1, min(math.ceil(2 * epochs), max(int(max_auto_epochs), math.ceil(epochs))))
    return {"low": low, "high": high}


def take(value, keep: list[int], n: int):
    """`value` at positions `keep` where it holds one entry per row of an `n`-row split (a numpy array, a list, a
    dict or dataclass of them); anything else (a scalar, a list of another length) as it is."""
    import dataclasses

    import numpy as np

    if isinstance(value, dict):
        return {k: take(v, keep, n) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: take(getattr(value, f.name), keep, n)
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, np.ndarray) and value.ndim and len(value) == n:
        return value[np.asarray(keep, dtype=np.int64)]
    if isinstance(value, list) and len(value) == n:
        return type(value)([value[i] for i in keep]) if type(value) is list else [value[i] for i in keep]
    return value
