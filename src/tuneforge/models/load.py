"""Apply the training method to a loaded model (full, frozen layers, LoRA) and save a plain `transformers`
directory (LoRA merged, safetensors only). Each task loads its own model class (tasks/<task>/model.py)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from tuneforge.config import TrainConfig
from tuneforge.errors import ModelNotFoundError
from tuneforge.models.dropout import use_fast_dropout


@contextlib.contextmanager
def quiet_transformers():
    """transformers prints a load report for the new head on every load; the run says it once, itself."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"no usable tokenizer in {model_dir} ({err})",
                                 fix="the model directory needs tokenizer.json or the tokenizer's vocabulary files") from None


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks, found structurally (BERT, RoBERTa, DistilBERT, ... name it differently)."""
    n = getattr(model.config, "num_hidden_layers", None)
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not candidates:
        raise ModelNotFoundError(f"cannot find the {n} encoder layers of {type(model).__name__} to freeze",
                                 fix="use train.method: full or lora for this architecture")
    return candidates[0]


def input_embeddings_module(model: nn.Module) -> nn.Module:
    base = model.base_model
    return getattr(base, "embeddings", None) or model.get_input_embeddings()


def apply_method(model, cfg: TrainConfig, peft_task_type: str | None = "SEQ_CLS", default_targets=None,
                 modules_to_save: list[str] | None = None):
    """Freeze or wrap the model for the chosen method; returns the model to train. `peft_task_type` is the
    task's (SEQ_CLS, TOKEN_CLS, CAUSAL_LM): peft then keeps the task's head trainable and saved;
    `default_targets` the task's LoRA targets where train.lora.target_modules is null. A task peft has no type for
    (None) names the `modules_to_save` it trains in full beside the adapters (its new head)."""
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            from tuneforge.errors import ConfigError
            raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing",
                              fix="set train.gradient_checkpointing: false")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.method == "frozen":
        layers = encoder_layers(model)
        n_frozen = len(layers) // 2 if cfg.frozen_layers is None else cfg.frozen_layers
        if n_frozen > len(layers):
            from tuneforge.errors import ConfigError
            raise ConfigError(f"train.frozen_layers is {cfg.frozen_layers} but the model has {len(layers)} layers",
                              fix=f"set train.frozen_layers between 0 and {len(layers)}")
        frozen = [input_embeddings_module(model), *list(layers)[:n_frozen]]
        for module in frozen:
            module.requires_grad_(False)
        model._tuneforge_frozen = frozen  # kept in eval mode (no dropout) during training
    elif cfg.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        targets = cfg.lora.target_modules or default_targets
        if targets == ["all-linear"]:
            targets = "all-linear"  # peft's shorthand: every linear layer but the output head
        lcfg = LoraConfig(task_type=TaskType[peft_task_type] if peft_task_type else None, r=cfg.lora.r,
                          lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets,
                          modules_to_save=modules_to_save)
        import warnings

        with warnings.catch_warnings():  # peft 0.21 asks transformers 5.24 a renamed attribute (FutureWarning)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, lcfg)
    use_fast_dropout(model)  # the model's and LoRA's dropout layers: the same rate, a quarter of the random draws on CPU
    return model


def set_train_mode(model) -> None:
    model.train()
    for module in getattr(model, "_tuneforge_frozen", []):
        module.eval()


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def export_adapter(model, out_dir: Path) -> None:
    """The LoRA adapter alone (peft format, safetensors), for serving many adapters on one base model."""
    import shutil

    from peft import PeftModel

    if not isinstance(model, PeftModel):
        from tuneforge.errors import ConfigError
        raise ConfigError("output.keep_adapter is set but the model has no adapter", fix="set train.method: lora")
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), safe_serialization=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)


def export_model(model, tokenizer, out_dir: Path) -> None:
    """A directory plain transformers loads: LoRA merged, fp32 safetensors, tokenizer, id2label."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    with quiet_transformers():
        model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
