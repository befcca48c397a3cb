"""What most tasks do alike, as defaults a task inherits and overrides where it differs (the causal LM
measures its own lengths, picks its own max_length, LoRA targets, loss and selection, adds to the export, and
mounts the OpenAI API when served)."""
from __future__ import annotations

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

    def export(self, cfg, model_dir: Path, tokenizer, space) -> None:
        """Anything the task adds to the exported model directory."""
        return None

    def mount_routes(self, app, ctx) -> None:
        """Routes the task adds to the server beside /v1/predict (ctx: serving.app.ServeContext)."""
        return None
