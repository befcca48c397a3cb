"""What `tuneforge predict` and /v1/predict read for images: files and folders on the command line; base64 strings
(or data: URLs) and multipart uploads over HTTP, checked before they reach the model (a 422 naming the image and
the limit). The server never reads a path a client sends."""
from __future__ import annotations

import base64
import functools
import io
import threading
from collections import OrderedDict
from pathlib import Path

from tuneforge.errors import DataError
import numpy as np

from tuneforge.tasks.image_classification.images import EXTENSIONS, BadImage, brightness, decode_base64, open_rgb

DEFAULT_MAX_PIXELS = 40_000_000


def read_inputs(values: list[str], path: Path | None, column: str | None, run_dir: Path) -> list[Path]:
    """--image FILE (repeatable), and --input: an image, a folder (its images, sub-folders included, sorted) or a
    CSV/JSONL/Parquet table whose image column (--text-column, default the run's task.image_column) holds paths
    relative to the table."""
    files = [Path(v) for v in values]
    if path is not None:
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in EXTENSIONS
                            and not f.name.startswith("."))
        elif path.suffix.lower() in EXTENSIONS:
            files.append(path)
        else:
            files += _table_images(path, column, run_dir)
    for f in files:
        if not f.is_file():
            raise DataError("the image does not exist", path=f, fix="check the path")
    if not files:
        raise DataError("no images to predict", fix="pass --image FILE or --input FOLDER")
    return files


def _table_images(path: Path, column: str | None, run_dir: Path) -> list[Path]:
    import yaml

    from tuneforge.data.load import read_table

    if column is None and (Path(run_dir) / "config.yaml").is_file():
        column = (yaml.safe_load((Path(run_dir) / "config.yaml").read_text()).get("task") or {}).get("image_column")
    column = column or "image"
    df = read_table(path)
    if column not in df.columns:
        raise DataError(f"image column '{column}' not found; the columns are: {', '.join(map(str, df.columns))}",
                        path=path, column=column, fix="pass --text-column with the column of image paths")
    return [path.parent / str(v) for v in df[column].tolist()]


DEFAULT_MAX_IMAGE_BYTES = 8_000_000


def check_inputs(items: list[str], settings) -> str | None:
    """Why a request's images are refused, or None: not base64, over serve --max-image-bytes (decoded), not an image,
    damaged, or over the model's pixel limit."""
    max_pixels = _max_pixels(settings)
    limit = (getattr(settings, "options", None) or {}).get("max_image_bytes") or DEFAULT_MAX_IMAGE_BYTES
    for i, item in enumerate(items):
        if len(item) * 3 // 4 > limit + 3:  # base64: 3 bytes per 4 characters; the exact size once decoded
            return f"image {i} is about {len(item) * 3 // 4} bytes, over the limit of {limit} (serve --max-image-bytes)"
        try:
            data = decode_base64(item)
            if len(data) > limit:
                return f"image {i} is {len(data)} bytes, over the limit of {limit} (serve --max-image-bytes)"
            _remember(item, open_rgb(data, max_pixels))  # decoded here once: its measures need no second decode
        except BadImage as err:
            return f"image {i}: {err}"
    return None


def _max_pixels(settings) -> int:
    return _max_pixels_of(str(Path(settings.run_dir) / "model" / "config.json"))


@functools.lru_cache(maxsize=8)
def _max_pixels_of(config: str) -> int:
    """The run's task.max_pixels, read once per served model (not on every request)."""
    import json

    path = Path(config)
    if path.is_file():
        return int((json.loads(path.read_text()).get("tuneforge") or {}).get("max_pixels", DEFAULT_MAX_PIXELS))
    return DEFAULT_MAX_PIXELS


# the latest checked images' measures, keyed by (hash, length) of the request's base64 string: small, holds no image
_MEASURED: OrderedDict[tuple[int, int], dict[str, float]] = OrderedDict()
_MEASURED_MAX = 1024
_MEASURED_LOCK = threading.Lock()


def _remember(item: str, image) -> None:
    found = _measure(image)
    with _MEASURED_LOCK:
        _MEASURED[(hash(item), len(item))] = found
        while len(_MEASURED) > _MEASURED_MAX:
            _MEASURED.popitem(last=False)


def _measure(image) -> dict[str, float]:
    image = image.copy()
    image.thumbnail((64, 64))
    return {"brightness": round(brightness(np.asarray(image)), 2)}


def pixel_count(item) -> int:
    """Width x height of an input (base64 string, file or bytes), from its header: the request log's size and
    the drift monitor's `length` signal for images. 0 when unreadable."""
    from PIL import Image

    try:
        data = item.read_bytes() if isinstance(item, Path) else item if isinstance(item, bytes) else decode_base64(item)
        with Image.open(io.BytesIO(data)) as im:
            return im.width * im.height
    except Exception:  # noqa: BLE001 - a size for the log only; the request was checked before
        return 0


def measures(item) -> dict[str, float]:
    """What the drift monitor watches of an input besides its size: its brightness (mean luminance of a thumbnail of at
    most 64 px a side). A served image was measured when its request was checked; anything else is decoded here.
    {} when unreadable."""
    if isinstance(item, str):
        with _MEASURED_LOCK:
            found = _MEASURED.pop((hash(item), len(item)), None)
        if found is not None:
            return found
    try:
        data = item.read_bytes() if isinstance(item, Path) else item if isinstance(item, bytes) else decode_base64(item)
        return _measure(open_rgb(data, DEFAULT_MAX_PIXELS))
    except (BadImage, OSError, ValueError):
        return {}


def parse_multipart(body: bytes, content_type: str) -> dict | None:
    """A multipart/form-data upload (curl -F image=@cat.png -F image=@dog.jpg) as {"images": [base64, ...]}: every
    file part, in order. None for another content type (the body is then read as JSON)."""
    if not content_type.lower().startswith("multipart/form-data"):
        return None
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    images = [base64.b64encode(part.get_payload(decode=True) or b"").decode("ascii")
              for part in message.iter_parts() if part.get_filename() is not None]
    return {"images": images}


