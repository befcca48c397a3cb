"""Reading one image, the way every stage needs it: decoded with Pillow, EXIF orientation applied, GIF's first
frame, any mode (greyscale, palette, RGBA, CMYK, 16-bit) made RGB, a pixel limit against decompression bombs, and
resized to the working resolution as uint8. Bad files raise BadImage with the reason; callers name the file."""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings

import numpy as np

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class BadImage(ValueError):
    """Not a readable image (the message says why)."""


def open_rgb(data: bytes, max_pixels: int):
    """A PIL RGB image from encoded bytes (a file's, or a request's)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise BadImage("the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise BadImage(f"{image.width}x{image.height} pixels is over the limit of {max_pixels} "
                               "(task.max_pixels): a decompression bomb, or an image to downscale first")
            image.seek(0)  # GIF / TIFF: the first frame
            image.load()
            image = ImageOps.exif_transpose(image)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can read (JPEG, PNG, WebP, BMP, GIF, TIFF)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"too many pixels ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise BadImage(f"the image is damaged or truncated ({err})") from None
    return to_rgb(image)


def to_rgb(image):
    """RGB, whatever the mode: transparency composited on white, CMYK and palettes converted, 16-bit scaled."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = arr.max() or 1.0
        image = Image.fromarray((arr / hi * 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def resized(image, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the image stretched to the square working resolution (bilinear, antialiased)."""
    from PIL import Image

    return np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.uint8)


BRIGHTNESS_EDGES = (0, 32, 64, 96, 128, 160, 192, 224, 256)  # mean luminance, 0-255: the drift monitor's bins


def brightness(pixels: np.ndarray) -> float:
    """Mean luminance (ITU-R 601 weights, as Pillow's greyscale) of RGB uint8 pixels, 0-255: a camera, exposure or
    lighting change shows here before it shows in the labels."""
    return float(np.asarray(pixels, dtype=np.float32)[..., :3].reshape(-1, 3).mean(axis=0) @ np.array([0.299, 0.587, 0.114]))


def pixel_sha(image) -> str:
    """The same pixels (whatever the file format or name) give the same hash: exact duplicates."""
    return hashlib.sha256(image.tobytes() + f"{image.size}".encode()).hexdigest()


def signature(image, side: int = 16) -> np.ndarray:
    """A 16x16 greyscale thumbnail, centred and scaled to unit length: two copies of one photo (re-encoded, resized,
    recoloured a little) have a cosine near 1 (0.998+ measured on Fashion-MNIST), two different photos rarely above
    0.99."""
    from PIL import Image

    g = np.asarray(image.convert("L").resize((side, side), Image.BILINEAR), dtype=np.float32).ravel()
    g -= g.mean()
    return g / (float(np.linalg.norm(g)) + 1e-6)


def decode_base64(item: str) -> bytes:
    """The bytes of a request's image: base64, or a data: URL (data:image/png;base64,...)."""
    if item.startswith("data:"):
        item = item.split(",", 1)[-1]
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage("not base64 (send the file's bytes base64-encoded, or a data: URL)") from None
