"""Write a causal LM's model directory (safetensors, a LoRA run's merged weights) as one GGUF file: what llama.cpp,
Ollama and LM Studio read. The reverse of models/gguf.py, with the `gguf` package's own writer, tensor-name map and
quantisers:

    write_gguf(Path("runs/llm/model"), Path("runs/llm/export/gguf/model-q8_0.gguf"), "q8_0")

Weights: f16, bf16 or q8_0 (norms and other 1-D tensors stay f32, as llama.cpp writes them). Metadata: the
architecture's hyperparameters, the BPE tokenizer (tokens, types, merges), the special token ids and the chat
template. Llama-family attention (llama, mistral, smollm) has its q/k rows permuted into llama.cpp's rotary layout.
Nothing here imports torch or transformers at module level.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tuneforge.errors import TuneforgeError

TYPES = ("f16", "bf16", "q8_0")
# transformers model_type -> GGUF architecture, for the architectures this writer maps (llama-style decoders)
_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_PERMUTE_QK = {"llama"}  # llama.cpp's llama graph expects q/k rows in its own rotary order


class GGUFExportError(TuneforgeError):
    """The model cannot be written as GGUF."""


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (what convert_hf_to_gguf.py does for llama)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir: Path, path: Path, out_type: str = "f16", *, name: str | None = None,
               pre_tokenizer: str = "default") -> dict:
    """Write `model_dir` to `path`; returns {"architecture", "tensors", "type", "bytes"}."""
    import gguf
    from safetensors.numpy import load_file

    if out_type not in TYPES:
        raise GGUFExportError(f"GGUF type {out_type!r} is not one of {', '.join(TYPES)}", fix="pass --quantize f16, bf16 or q8_0")
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config.get("model_type")
    arch_name = _ARCH.get(model_type)
    if arch_name is None:
        raise GGUFExportError(f"GGUF export knows the llama, mistral and qwen2 architectures; this model is "
                              f"{model_type!r}", fix="convert it with llama.cpp's convert_hf_to_gguf.py from OUT/model")
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    names = gguf.get_tensor_name_map(arch, n_layers)

    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_name(name or model_dir.resolve().parent.name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    writer.add_file_type(file_type)
    _add_tokenizer(writer, model_dir, config["vocab_size"], pre_tokenizer)

    weights = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    if config.get("tie_word_embeddings") and "lm_head.weight" in weights:
        del weights["lm_head.weight"]  # llama.cpp ties the output to token_embd when output.weight is absent
    count = 0
    for hf_name, tensor in weights.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"no GGUF name for tensor {hf_name} of {model_type}",
                                  fix="convert it with llama.cpp's convert_hf_to_gguf.py from OUT/model")
        data = tensor.astype(np.float32) if tensor.dtype != np.float32 else tensor
        if arch_name in _PERMUTE_QK and hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif arch_name in _PERMUTE_QK and hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        data, qtype = _quantised(gguf, data, out_type)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch_name, "tensors": count, "type": out_type, "bytes": path.stat().st_size}


def _quantised(gguf, data: np.ndarray, out_type: str):
    """(data, GGML type): 1-D tensors (norms, biases) stay f32; matrices as asked (q8_0 needs rows of 32)."""
    if data.ndim <= 1:
        return data, gguf.GGMLQuantizationType.F32
    if out_type == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = gguf.GGMLQuantizationType.BF16 if out_type == "bf16" else gguf.GGMLQuantizationType.Q8_0
    if out_type == "q8_0" and data.shape[-1] % 32:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, qtype), qtype


def _add_tokenizer(writer, model_dir: Path, n_vocab: int, pre_tokenizer: str) -> None:
    """A byte-level BPE tokenizer (tokenizer.json) as GGUF's `gpt2` model: tokens by id (padded to the model's
    vocabulary with [PAD{i}]), token types (control for special added tokens), merges, special ids, chat template."""
    import gguf

    spec = json.loads((model_dir / "tokenizer.json").read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"GGUF export writes byte-level BPE tokenizers; {model_dir / 'tokenizer.json'} is "
                              f"{model.get('type')!r}", fix="convert it with llama.cpp's convert_hf_to_gguf.py from OUT/model")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    tokens, types = [], []
    for i in range(n_vocab):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    special.add_to_gguf(writer)
