"""The data stage for images: a folder of class sub-folders (with optional train/ validation/ test/ sub-folders
taken as given splits) or a CSV/JSONL/Parquet/xlsx table of image paths and labels; every image decoded once,
checked, and cached at the working resolution (uint8) with its pixel hash and thumbnail signature; the split is the
generic one, with duplicate groups found by those hashes."""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuneforge.config import DataConfig
from tuneforge.data.clean import Examples, is_null
from tuneforge.data.load import detect_format, read_table, resolve_path
from tuneforge.data.neardup import DuplicateGraph
from tuneforge.data.prepare import PreparedData, assemble, held_out_files
from tuneforge.errors import DataError
from tuneforge.tasks.image_classification.images import EXTENSIONS, BadImage, open_rgb, pixel_sha, resized, signature

NEAR_SCALE = 40  # similarity = 1 - 40 x cosine distance: audit.near_duplicate_threshold 0.8 = cosine 0.995
SPLIT_FOLDERS = {"train": "train", "validation": "val", "val": "val", "test": "test"}
MIN_AUTO_SIZE = 64


@dataclass
class Entry:
    """One image to read: its file, label, the row it is (a table's data row, or its place in a folder listing)."""
    file: Path
    label: str | tuple[str, ...]  # a tuple of labels for multi-label
    row: int
    name: str  # as the user knows it: relative to the data folder or the table's folder


def _inside(root: Path, file: Path) -> bool:
    try:
        file.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def folder_entries(root: Path) -> list[Entry]:
    """DIR/<label>/<image>: every image file under each class folder (sorted; hidden files skipped)."""
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError("the folder has no class sub-folders", path=root,
                        fix="put each class's images in a sub-folder named after the label: DIR/cat/1.png, DIR/dog/2.png")
    entries = []
    for folder in classes:
        files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith(".")
                       and f.suffix.lower() in EXTENSIONS)
        if not files:
            raise DataError(f"class folder '{folder.name}' holds no images ({', '.join(sorted(EXTENSIONS))})", path=folder,
                            fix="add images to it, or remove the empty folder")
        for f in files:
            if not _inside(root, f):
                raise DataError("the file links outside the data folder", path=f, fix="copy the image into the folder")
            entries.append(Entry(f, folder.name, 0, str(f.relative_to(root))))
    for k, e in enumerate(entries):
        e.row = k
    return entries


def _labels_of(value, multi_label: bool, separator: str):
    """A table cell's label, or for multi-label its labels (a JSON list, a list, or joined by `separator`), sorted."""
    if not multi_label:
        return str(value).strip()
    if hasattr(value, "tolist") and not isinstance(value, str):  # Parquet lists arrive as numpy arrays
        value = value.tolist()
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    parts = value if isinstance(value, (list, tuple)) else str(value).split(separator)
    return tuple(sorted({str(p).strip() for p in parts if str(p).strip()}))


def table_entries(path: Path, cfg: DataConfig, image_column: str, multi_label: bool = False) -> list[Entry]:
    """A table's rows: image path (relative to the table's folder, never outside it) and label (labels)."""
    df = read_table(path, cfg.format, cfg.encoding, sheet=cfg.sheet)
    for column in (image_column, cfg.label_column):
        if column not in df.columns:
            raise DataError(f"column '{column}' not found; the columns are: {', '.join(map(str, df.columns))}",
                            path=path, column=column, fix="set task.image_column / data.label_column")
    root, entries = path.parent, []
    for i, (ref, label) in enumerate(zip(df[image_column].tolist(), df[cfg.label_column].tolist())):
        for value, column in ((ref, image_column), (label, cfg.label_column)):
            if is_null(value) or str(value).strip() == "":
                raise DataError("the cell is empty", path=path, row=i, column=column, fix="fill it, or drop the row")
        file = (root / str(ref).strip())
        if not _inside(root, file):
            raise DataError(f"the image path '{ref}' leads outside the table's folder {root}", path=path, row=i,
                            column=image_column, fix="keep images in the table's folder (or below it), paths relative to it")
        if not file.is_file():
            raise DataError(f"the image '{ref}' does not exist (looked for {file})", path=path, row=i, column=image_column,
                            fix="correct the path (relative to the table's folder) or remove the row")
        labels = _labels_of(label, multi_label, cfg.label_separator)
        if multi_label and not labels:
            raise DataError("the label cell names no label", path=path, row=i, column=cfg.label_column,
                            fix=f'give one or more labels: ["cat", "outdoor"] or cat{cfg.label_separator}outdoor')
        entries.append(Entry(file, labels, i, str(ref).strip()))
    return entries


def entries_of(ref: str, cfg: DataConfig, image_column: str, multi_label: bool = False) -> tuple[Path, list[Entry], str]:
    path = resolve_path(ref)
    if path.is_dir():
        if multi_label:
            raise DataError("task.multi_label is set, and a folder of class sub-folders gives one label per image",
                            path=path, fix="list the images in a CSV/JSONL table with an image column and a label column "
                                           'holding each image\'s labels (["cat", "outdoor"]), or unset task.multi_label')
        return path, folder_entries(path), "folder"
    if not path.exists():
        raise DataError("the data path does not exist", path=path, fix="pass a folder of class sub-folders or a table")
    return path, table_entries(path, cfg, image_column, multi_label), detect_format(path, cfg.format)


def given_splits(root: Path) -> dict[str, Path]:
    """train/ validation/ test/ sub-folders of a data folder, by role (train, val, test); {} when there is no train/."""
    found = {SPLIT_FOLDERS[p.name.lower()]: p for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_FOLDERS}
    return found if "train" in found else {}


def peek_sides(entries: list[Entry]) -> list[int]:
    """Each readable image's longer side, from its header only (no decoding)."""
    from PIL import Image

    sides = []
    for e in entries:
        try:
            with Image.open(e.file) as im:
                sides.append(max(im.size))
        except Exception:  # noqa: BLE001 - a bad file is named when it is decoded
            continue
    return sides


def working_size(configured: int | None, model_size: int, resizable: bool, sides: list[int]) -> tuple[int, str]:
    """task.image_size, else the model's own resolution, or less when every image is smaller and the model takes
    other sizes (a multiple of 32, at least 64): upscaling 28-pixel images to 224 costs 64x the compute and adds
    nothing."""
    if configured:
        return configured, "task.image_size"
    largest = max(sides, default=model_size)
    if resizable and largest < model_size:
        size = max(MIN_AUTO_SIZE, min(model_size, 32 * math.ceil(largest / 32)))
        return size, f"every image is at most {largest} px: {size} instead of the model's {model_size}"
    return model_size, "the model's resolution"


def decode_all(entries: list[Entry], source: Path, size: int, max_pixels: int, skip_bad: bool,
               removed: list[dict]) -> Examples:
    """Every image decoded once: its pixels at `size`, pixel hash, thumbnail signature, size and mode. A bad image stops
    the run (DataError naming the file), or with data.skip_bad_images is left out and listed in `removed`."""
    texts, labels, rows = [], [], []
    extras = {"pixels": [], "sha": [], "signature": [], "width": [], "height": [], "mode": []}
    for e in entries:
        try:
            data = e.file.read_bytes()
            mode = _mode_of(data)
            image = open_rgb(data, max_pixels)
        except (BadImage, OSError) as err:
            if not skip_bad:
                raise DataError(f"{err}", path=e.file, fix="remove or replace the file, or set data.skip_bad_images: "
                                "true to skip such images (each is listed in data_report.json)") from None
            removed.append({"file": str(source), "row": e.row, "reason": "bad_image", "detail": f"{e.name}: {err}"})
            continue
        texts.append(e.name)
        labels.append(e.label)
        rows.append(e.row)
        extras["pixels"].append(resized(image, size))
        extras["sha"].append(pixel_sha(image))
        extras["signature"].append(signature(image))
        extras["width"].append(image.width)
        extras["height"].append(image.height)
        extras["mode"].append(mode)
    return Examples(texts, labels, rows, str(source), extras)


def _mode_of(data: bytes) -> str:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.mode
    except Exception:  # noqa: BLE001 - open_rgb says what is wrong
        return "?"


def drop_copies(ex: Examples, removed: list[dict]) -> Examples:
    """The same pixels twice: keep the first; the same pixels under different labels: drop them all."""
    by_sha: dict[str, list[int]] = {}
    for k, sha in enumerate(ex.extras["sha"]):
        by_sha.setdefault(sha, []).append(k)
    keep = []
    for k, sha in enumerate(ex.extras["sha"]):
        group = by_sha[sha]
        labels = {ex.labels[i] for i in group}
        if len(labels) > 1:
            removed.append({"file": ex.source, "row": ex.rows[k], "reason": "conflicting_labels",
                            "detail": f"{ex.texts[k]}: the same pixels as {len(group) - 1} other image(s) labelled "
                                      f"{sorted(labels)}"})
        elif group[0] != k:
            removed.append({"file": ex.source, "row": ex.rows[k], "reason": "duplicate",
                            "detail": f"{ex.texts[k]}: the same pixels as {ex.texts[group[0]]}"})
        else:
            keep.append(k)
    return ex.subset(keep) if len(keep) < len(ex) else ex


def image_duplicates(parts: list[Examples], keys: list[tuple[str, int]], threshold: float) -> DuplicateGraph:
    """Exact copies (the same pixels) and near copies: thumbnail similarity, 1 - 40 x the cosine distance of the
    16x16 greyscale signatures, at least `threshold` (audit.near_duplicate_threshold; 0.8 = cosine 0.995, where
    re-encoded or resized copies of one photo measure 0.998 and up)."""
    shas = [s for ex in parts for s in ex.extras["sha"]]
    sig = np.stack([v for ex in parts for v in ex.extras["signature"]]).astype(np.float32)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(shas):
        groups.setdefault(s, []).append(i)
    exact = [g for g in groups.values() if len(g) > 1]
    same = {i: g[0] for g in exact for i in g}
    near = []
    min_cos = 1 - (1 - threshold) / NEAR_SCALE
    for start in range(0, len(sig), 1024):  # in blocks: 60k images are 60k x 60k dot products of 256 values
        cos = sig[start:start + 1024] @ sig.T
        for a, b in zip(*np.nonzero(cos >= min_cos)):
            i, j = int(a) + start, int(b)
            if i < j and same.get(i, i) != same.get(j, j):
                near.append((i, j, round(max(0.0, 1 - NEAR_SCALE * (1 - float(cos[a, b]))), 4)))
    return DuplicateGraph(keys=list(keys), exact=exact, near=near, threshold=threshold,
                          exact_means="the same pixels", similarity="thumbnail similarity")


def _files_info(path: Path, fmt: str, ex: Examples, rows_read: int) -> dict:
    digest = hashlib.sha256(json.dumps(sorted(zip(ex.texts, ex.extras["sha"]))).encode()).hexdigest()
    return {"path": str(path), "format": fmt, "sha256": digest, "rows_read": rows_read, "rows_kept": len(ex)}


def prepare_images(cfg, model_size: int, resizable: bool) -> PreparedData:
    """Read, decode, check and split the images of data.path (and data.val_path / data.test_path, or the data
    folder's own validation/ and test/ sub-folders, taken as given)."""
    d, task = cfg.data, cfg.task
    path = resolve_path(d.path)
    refs = {"main": d.path, **held_out_files(d)}
    if path.is_dir() and given_splits(path):
        folders = given_splits(path)
        refs = {"main": str(folders["train"]), **{r: str(p) for r, p in folders.items() if r != "train"},
                **held_out_files(d)}
    listed = {role: entries_of(ref, d, task.image_column, task.multi_label) for role, ref in refs.items()}
    size, why = working_size(task.image_size, model_size, resizable, [s for _, es, _ in listed.values() for s in peek_sides(es)])
    removed, files, parts = [], [], {}
    for role, (where, entries, fmt) in listed.items():
        ex = decode_all(entries, where, size, task.max_pixels, d.skip_bad_images, removed)
        if not len(ex):
            raise DataError("no readable images", path=where, fix="check the files, or the folder layout DIR/<label>/*.png")
        if role == "main":
            ex = drop_copies(ex, removed)
        parts[role] = ex
        files.append({**_files_info(where, fmt, ex, len(entries)), **({"role": role} if role != "main" else {})})
    report = {"multi_label": task.multi_label, "long_texts": [], "image_size": size, "image_size_why": why,
              "image_modes": dict(Counter(m for ex in parts.values() for m in ex.extras["mode"]))}

    def class_counts(labels: list) -> dict[str, int]:  # multi-label: each label of a row counts once
        return dict(sorted(Counter(lab for labs in labels for lab in labs).items() if task.multi_label
                           else Counter(labels).items()))

    return assemble(parts.pop("main"), parts, files, removed, d, cfg.audit.near_duplicate_threshold, report,
                    class_counts, leakage=cfg.audit.leakage, find_duplicates=image_duplicates)
