"""What most tasks do alike, as defaults a task inherits and overrides where it differs (the causal LM
measures its own lengths, picks its own max_length, LoRA targets, loss, selection and search space, adds to the
export, and mounts the OpenAI API when served)."""
from __future__ import annotations

import math
from pathlib import Path


class TaskDefaults:
    def token_lengths(self, cfg, tokenizer, data) -> dict:
        """Tokens per row of each split before truncation: what the audit and max_length: null measure."""
        from tuneforge.models.infer import token_lengths

        return {name: token_lengths(tokenizer, ex.texts) for name, ex in data.splits.items()}

    def max_length(self, cfg, train_lengths, tokenizer, model_dir: Path) -> tuple[int, str]:
        from tuneforge.models.infer import resolve_max_length

        return resolve_max_length(cfg.model.max_length, train_lengths, tokenizer, model_dir)

    def lora_targets(self):
        return None  # peft's default for the architecture

    def training_loss(self):
        return None  # the model's own loss

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

    def export(self, cfg, model_dir: Path, tokenizer, space) -> None:
        """Anything the task adds to the exported model directory."""
        return None

    def mount_routes(self, app, ctx) -> None:
        """Routes the task adds to the server beside /v1/predict (ctx: serving.app.ServeContext)."""
        return None


def epochs_range(epochs: float | None, max_auto_epochs: float) -> dict:
    """Half to twice the run's own passes (at least 1 to 2, at most max_auto_epochs unless the run's own is more):
    the search weighs a shorter or longer schedule than the default without trials of many times its cost (the
    run's epochs aim at ~600 steps already). Unknown: 1 to max_auto_epochs."""
    if epochs is None:
        return {"low": 1, "high": max(1, int(max_auto_epochs))}
    low = max(1, int(epochs // 2))
    high = max(low + 1, min(math.ceil(2 * epochs), max(int(max_auto_epochs), math.ceil(epochs))))
    return {"low": low, "high": high}
