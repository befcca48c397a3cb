"""What the GPU check (bench/gpu_check.sh) takes to a machine that has a GPU but neither our packages nor our models.

    .venv/bin/python bench/gpu_assets.py prepare            # here, from bench/gpu_prepare.sh: fills .gpu/ and .whl/
    python3 bench/gpu_assets.py install .whl /tmp/site      # there, from bench/gpu_check.sh: the wheels it lacks
    python3 bench/gpu_assets.py standin OUT.json DIR REF... # there: each model rebuilt with random weights

Real weights cannot travel (a call carries 64 MiB; MiniLM's weights are 87 MB, SmolLM2's GGUF 94 MB), so `.gpu/models/`
holds each example's model *without* its weights (config, tokenizer, chat template), and `standin` builds the same
architecture at the same size with random weights: training speed, memory and the estimate do not depend on the
values, accuracy does (a check on stand-ins says so). `.gpu/data/` holds the examples' data files that do not travel
with the working tree (files inside installed packages, `pkg:...`; git-ignored files such as examples/data/*.jsonl).
`.whl/` holds the wheels of the packages tuneforge needs that the GPU machine lacks (its package list: KINDS.md of
the device tool), at the versions installed here.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / ".gpu"
WHL_DIR = ROOT / ".whl"

# The GPU machine's Python packages (image 'cuda', as the device tool's KINDS.md lists them, read 2026-11-17).
GPU_PACKAGES = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split())
# tuneforge dependencies the check does not use: not carried (listed as missing, with why)
NOT_NEEDED = {"optuna": "`tuneforge tune` only", "gguf": "GGUF models only (the check builds stand-ins from config files)",
              "openpyxl": "Excel data only"}
# packages the machine has whose bounds (from the carried packages: pydantic, fastapi, starlette) are recent enough to
# matter: a small pure-Python wheel of each travels, installed there only if the machine's version is outside the
# bound. The machine's other packages (pandas, scikit-learn, scipy, ...) are taken as they are: their bounds are old.
FALLBACK_OK = {"typing-extensions", "anyio", "annotated-doc", "h11", "click"}
MODEL_CODE = ["efficientnet-lite-pytorch"]  # model code an example's default model needs (not a pyproject dependency)
CARRIED_WEIGHTS_MAX = 25e6  # a model whose weights are this small travels with its real weights (EfficientNet-Lite0)
EXTRAS = {"uvicorn": ["httptools"]}  # uvicorn[standard]'s HTTP parser; its uvloop is there, the rest serve does not use
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack")
MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def safe_name(ref: str) -> str:
    """A model reference or path as one folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", ref.strip("/"))[-80:]


# ------------------------------------------------------------------ wheels

def wheel_plan() -> dict:
    """The pyproject dependencies the GPU machine lacks and, through their requirements, everything they need that
    it lacks too (at the versions installed here); requirements on a package it has, with a version bound, get a
    fallback wheel, installed there only when its own version is outside the bound."""
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [Requirement(d) for d in deps] + [Requirement(n) for n in MODEL_CODE]
    todo += [Requirement(x) for r in list(todo) for x in EXTRAS.get(norm(r.name), [])]
    install, fallback, bounds, not_needed, missing = {}, {}, {}, {}, []
    seen: set[str] = set()
    while todo:
        req = todo.pop(0)
        name = norm(req.name)
        if req.marker is not None and not req.marker.evaluate(MARKER_ENV):
            continue
        if str(req.specifier):
            bounds.setdefault(name, set()).add(str(req.specifier))
        if name in GPU_PACKAGES:
            if str(req.specifier) and name in FALLBACK_OK:
                fallback.setdefault(name, set()).add(str(req.specifier))
            continue
        if name in seen:
            continue
        seen.add(name)
        if name in NOT_NEEDED:
            not_needed[name] = NOT_NEEDED[name]
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            missing.append(name)
            continue
        install[name] = dist.version
        for r in dist.requires or []:
            r = Requirement(r)
            if r.marker is None or r.marker.evaluate(MARKER_ENV):
                todo.append(r)
    fallback_versions = {}
    for name in fallback:
        try:
            fallback_versions[name] = md.version(name)
        except md.PackageNotFoundError:
            missing.append(name)
    return {"install": install, "fallback": {k: sorted(v) for k, v in fallback.items()},
            "bounds": {k: sorted(v) for k, v in bounds.items() if k in install or k in fallback},
            "fallback_versions": fallback_versions, "not_needed": not_needed, "missing_here": missing}


def download_wheels(plan: dict, dest: Path) -> list[str]:
    """pip download of each wheel for CPython 3.12 on x86-64 Linux; a package published only as a source archive is
    built into a wheel here (pure Python ones: seqeval, rouge-score). Returns what failed."""
    dest.mkdir(exist_ok=True)
    failed = []
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                              "manylinux2014_x86_64", "manylinux1_x86_64", "any")]
    for name, version in {**plan["install"], **plan["fallback_versions"]}.items():
        if any(norm(w.name.split("-")[0]) == name for w in dest.glob("*.whl")):
            continue
        spec = f"{name}=={version}"
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *platforms, "-d", str(dest), spec]
        if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
            built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), spec],
                                   capture_output=True, text=True)
            if built.returncode != 0:
                failed.append(f"{spec}: {built.stderr.strip()[-300:]}")
                continue
            if not any(norm(w.name.split("-")[0]) == name and "none-any" in w.name for w in dest.glob("*.whl")):
                failed.append(f"{spec}: only a platform-specific wheel could be built here")
        print(f"  wheel {spec}", flush=True)
    return failed


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return norm(name), version


def _wheel_requires(whl: Path) -> list:
    """The wheel's own requirements (its METADATA), those that apply on this machine, extras left out."""
    import zipfile

    from packaging.requirements import Requirement

    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode("utf-8", "replace").splitlines()
    reqs = [Requirement(x.split(":", 1)[1].strip()) for x in lines if x.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def install(wheels: Path, site: Path) -> dict:
    """Install into `site` (to be put first on PYTHONPATH) the carried wheels this machine lacks, and those it has at
    a version outside a bound that pyproject.toml or a wheel being installed sets (repeated until nothing changes, so
    a package kept here keeps its own partners: a pydantic found here keeps its pydantic-core). Nothing is fetched."""
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement

    found = {}
    for whl in sorted(wheels.glob("*.whl")):
        name, version = wheel_name_version(whl)
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            have = None
        found[name] = (whl, have)
    project = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    requires = {name: _wheel_requires(whl) for name, (whl, _) in found.items()}
    chosen = {name for name, (_, have) in found.items() if have is None}
    changed = True
    while changed:
        changed = False
        for r in project + [r for name in chosen for r in requires[name]]:
            name = norm(r.name)
            if name in found and name not in chosen and not r.specifier.contains(found[name][1], prereleases=True):
                chosen.add(name)
                changed = True
    kept = {name: have for name, (_, have) in found.items() if name not in chosen}
    chosen = [found[name][0] for name in sorted(chosen)]
    result = {"site": str(site), "installed": [w.name for w in chosen], "already_here": kept}
    if chosen:
        site.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--upgrade", "--target", str(site), *map(str, chosen)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        result["returncode"] = p.returncode
        if p.returncode:
            result["error"] = p.stderr[-2000:]
    return result


# ------------------------------------------------------------------ examples: their models and data

def example_configs() -> list[Path]:
    return sorted((ROOT / "examples").glob("*.yaml"))


def read_example(path: Path) -> dict:
    """The example's YAML as written, `task` in its long form."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    task = raw.get("task") or {"type": "text-classification"}
    raw["task"] = {"type": task} if isinstance(task, str) else {"type": "text-classification", **task}
    return raw


def model_reference(path: Path) -> str:
    """The model the example trains: its model.name, or its task's default (tuneforge's config fills it in)."""
    from tuneforge.config import load_config

    return load_config(path).model.name


def resolve_any(ref: str, task: str | None = None) -> Path:
    """The model directory a reference names, resolved by `task` (a package a task converts, such as
    EfficientNet-Lite0), else by every registered task in turn; the first error if none resolves it."""
    from tuneforge.tasks import TASKS
    from tuneforge.tasks.behaviour import get_task

    first = None
    for name in ([task] if task else []) + [t for t in TASKS if t != task]:
        try:
            return get_task(name).resolve_model(ref)[0]
        except Exception as err:  # noqa: BLE001 - the next task may know the reference
            first = first or err
    raise first


def data_refs(raw: dict) -> list[str]:
    return [raw.get("data", {}).get(k) for k in ("path", "test_path", "val_path") if raw.get("data", {}).get(k)]


def generator_of(example: Path) -> str | None:
    """`python examples/X.py` named in the example's header comment: the script that writes its data file."""
    head = "".join(line for line in example.read_text().splitlines(True) if line.startswith("#"))
    m = re.search(r"python (examples/\S+\.py)", head)
    return m.group(1) if m else None


def carried_data_path(ref: str) -> Path:
    """Where .gpu/ holds a data file that does not travel with the working tree."""
    if ref.startswith("pkg:"):
        package, _, rel = ref[4:].partition("/")
        return GPU_DIR / "data" / "pkg" / package / rel
    return GPU_DIR / "data" / "files" / ref


def local_data_path(ref: str, carried: bool = True) -> Path | None:
    """The data file on this machine: the package's or the working tree's, else (`carried`) the copy in .gpu/."""
    if ref.startswith("pkg:"):
        package, _, rel = ref[4:].partition("/")
        spec = importlib.util.find_spec(package.replace("-", "_"))
        if spec is not None and spec.submodule_search_locations:
            found = Path(list(spec.submodule_search_locations)[0]) / rel
            if found.is_file():
                return found
    else:
        p = Path(ref) if Path(ref).is_absolute() else ROOT / ref
        if p.is_file() or p.is_dir():  # a folder: images in class sub-folders
            return p
    copy = carried_data_path(ref)
    return copy if carried and copy.exists() else None


def _ignored(path: Path) -> bool:
    return subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(path)]).returncode == 0


def prepare_examples() -> dict:
    """Copy each example's model files (no weights) and its data files that would not travel into .gpu/."""
    from tuneforge.models.resolve import describe

    done = {"models": {}, "data": {}}
    for old in (GPU_DIR / "data", GPU_DIR / "models"):  # nothing stale travels
        shutil.rmtree(old, ignore_errors=True)
    for example in example_configs():
        raw = read_example(example)
        for ref in data_refs(raw):
            src = local_data_path(ref, carried=False)
            if src is None and not ref.startswith("pkg:") and generator_of(example):
                script = generator_of(example)
                print(f"  writing {ref} with {script}", flush=True)
                subprocess.run([sys.executable, str(ROOT / script), str(ROOT / ref)], check=True, cwd=ROOT)
                src = local_data_path(ref, carried=False)
            if src is None:
                done["data"][ref] = "NOT FOUND here: the example cannot run there"
                continue
            if ref.startswith("pkg:") or (src.is_relative_to(ROOT) and _ignored(src)):
                dst = carried_data_path(ref)
                dst.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    shutil.copytree(src, dst, dirs_exist_ok=True)
                else:
                    shutil.copy2(src, dst)
                size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()) if dst.is_dir() else dst.stat().st_size
                done["data"][ref] = f"{dst.relative_to(ROOT)} ({size / 1e6:.2f} MB)"
            else:
                done["data"][ref] = "travels with the working tree"
        ref = model_reference(example)
        if ref in done["models"]:
            continue
        model_dir = resolve_any(ref, raw["task"]["type"])
        dst = GPU_DIR / "models" / safe_name(ref)
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        weights = [f for f in model_dir.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)]
        carried = sum(f.stat().st_size for f in weights) <= CARRIED_WEIGHTS_MAX  # small enough: the real weights travel
        for f in model_dir.iterdir():
            if f.is_file() and (carried or not f.name.endswith(WEIGHT_SUFFIXES)) and f.name != "tuneforge-gguf.json" \
                    and f.stat().st_size < max(20e6, CARRIED_WEIGHTS_MAX if carried else 0):
                shutil.copy2(f, dst / f.name)  # tuneforge-gguf.json: a conversion the stand-in never had
        d = describe(model_dir)
        (dst / "standin.json").write_text(json.dumps({"reference": ref, "source": str(model_dir), "weights_carried": carried,
                                                      **d}, indent=2))
        size = sum(f.stat().st_size for f in dst.iterdir())
        done["models"][ref] = f"{dst.relative_to(ROOT)} ({size / 1e6:.2f} MB; {d['architecture']}, {d['parameters'] / 1e6:.1f}M parameters)"
    return done


# ------------------------------------------------------------------ stand-in models (there)

def real_model(ref: str) -> Path | None:
    """The real model directory when this machine has it; a GGUF package counts only when `gguf` can convert it."""
    try:
        return resolve_any(ref)
    except Exception:  # not installed, or not convertible here
        return None


def build_standin(ref: str, dest_root: Path) -> tuple[Path, dict]:
    """The model's architecture at its size with random weights (seeded), from the config and tokenizer in .gpu/."""
    import torch
    import transformers

    src = GPU_DIR / "models" / safe_name(ref)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"no real model {ref!r} here and no stand-in files in {src}: run bench/gpu_prepare.sh")
    meta = json.loads((src / "standin.json").read_text())
    if meta.get("weights_carried"):  # the real weights travelled in .gpu/: no stand-in needed
        return src, {"reference": ref, "weights": "real (carried in .gpu/)", "architecture": meta["architecture"],
                     "parameters": meta["parameters"], "path": str(src)}
    dst = dest_root / safe_name(ref)
    stamp = {"reference": ref, "architecture": meta["architecture"], "parameters_real": meta["parameters"],
             "transformers": transformers.__version__}
    if (dst / "model.safetensors").is_file() and (dst / "standin.json").is_file() \
            and json.loads((dst / "standin.json").read_text()).get("stamp") == stamp:
        return dst, json.loads((dst / "standin.json").read_text())
    shutil.rmtree(dst, ignore_errors=True)
    config = transformers.AutoConfig.from_pretrained(src)
    torch.manual_seed(0)
    cls = getattr(transformers, meta["architecture"], None)
    # random init, fp32, as the real one is stored
    model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    model.save_pretrained(dst, safe_serialization=True)
    for f in src.iterdir():  # tokenizer, chat template, generation config: the real model's
        if f.is_file() and f.name not in ("config.json", "standin.json"):
            shutil.copy2(f, dst / f.name)
    params = sum(p.numel() for p in model.parameters())
    info = {"stamp": stamp, "reference": ref, "weights": "random (stand-in: accuracy figures mean nothing)",
            "architecture": meta["architecture"], "parameters": params, "parameters_real": meta["parameters"],
            "path": str(dst)}
    (dst / "standin.json").write_text(json.dumps(info, indent=2))
    return dst, info


def standins(refs: list[str], dest_root: Path, mode: str) -> dict:
    """ref -> {"path", "weights": "real" | "random ...", ...}; mode auto: the real model where this machine has it."""
    out = {}
    for ref in refs:
        real = real_model(ref) if mode in ("auto", "real") else None
        if real is not None:
            out[ref] = {"reference": ref, "weights": "real", "path": str(real)}
        elif mode == "real":
            out[ref] = {"reference": ref, "error": "the real model is not on this machine"}
        else:
            try:
                out[ref] = build_standin(ref, dest_root)[1]
            except Exception as err:
                out[ref] = {"reference": ref, "error": f"{type(err).__name__}: {err}"}
    return out


# ------------------------------------------------------------------ command line

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="here: fill .gpu/ (model files, data) and .whl/ (wheels)")
    p.add_argument("--no-wheels", action="store_true")
    p = sub.add_parser("install", help="there: install the carried wheels the machine lacks")
    p.add_argument("wheels", type=Path)
    p.add_argument("site", type=Path)
    p.add_argument("--record", type=Path)
    p = sub.add_parser("standin", help="there: a directory per model, real or random stand-in")
    p.add_argument("record", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("refs", nargs="+")
    p.add_argument("--mode", choices=["auto", "real", "standin"], default="auto")
    args = ap.parse_args()
    if args.cmd == "install":
        result = install(args.wheels, args.site)
        if args.record:
            args.record.parent.mkdir(parents=True, exist_ok=True)
            args.record.write_text(json.dumps(result, indent=2))
        print(f"wheels installed into {args.site}: {', '.join(result['installed']) or 'none needed'}")
        if result.get("error"):
            print(result["error"], file=sys.stderr)
        return 1 if result.get("error") else 0
    if args.cmd == "standin":
        result = standins(args.refs, args.dest, args.mode)
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(result, indent=2))
        for ref, info in result.items():
            print(f"{ref}: {info.get('error') or info['weights'] + ' -> ' + info['path']}")
        return 1 if any("error" in i for i in result.values()) else 0
    GPU_DIR.mkdir(exist_ok=True)
    print("examples' models and data -> .gpu/", flush=True)
    done = prepare_examples()
    for kind, items in done.items():
        for k, v in items.items():
            print(f"  {dict(models='model', data='data')[kind]} {k}: {v}")
    if not args.no_wheels:
        plan = wheel_plan()
        print("pyproject dependencies (and theirs) the GPU machine lacks: " + ", ".join(f"{k}=={v}" for k, v in plan["install"].items()))
        print("  not carried (the check does not use them): " + ", ".join(f"{k} ({v})" for k, v in plan["not_needed"].items()))
        print("  fallbacks (installed there only if its version is outside the bound): "
              + ", ".join(f"{k} {','.join(v)}" for k, v in plan["fallback"].items()))
        if plan["missing_here"]:
            print("  NOT installed here either (cannot be carried): " + ", ".join(plan["missing_here"]))
        failed = download_wheels(plan, WHL_DIR)
        (WHL_DIR / "plan.json").write_text(json.dumps(plan, indent=2))
        if failed:
            print("wheels that could not be fetched:\n  " + "\n  ".join(failed), file=sys.stderr)
            return 1
    return 0 if all("NOT FOUND" not in v for v in done["data"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
