"""Write a Fashion-MNIST subset as a folder of PNGs, the way a user's images arrive:

    python examples/fashion_mnist.py [examples/data/fashion_mnist] [--per-class 400] [--test-per-class 100]

DIR/train/<label>/<n>.png and DIR/test/<label>/<n>.png (the official test images, never trained on). Read from
Debian's dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`: /usr/share/datasets/fashion-mnist/, IDX
files, MIT licence); `make demo-image` installs it when missing. The subset is balanced and drawn with a fixed seed.
"""
from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path

import numpy as np

SOURCE = Path("/usr/share/datasets/fashion-mnist")
LABELS = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (big-endian header: magic with the dimension count, then each dimension's size) as uint8."""
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_split(out: Path, images: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> int:
    from PIL import Image

    rng = np.random.default_rng(seed)
    n = 0
    for c, name in enumerate(LABELS):
        (out / name).mkdir(parents=True, exist_ok=True)
        for k in rng.permutation(np.flatnonzero(labels == c))[:per_class]:
            Image.fromarray(images[k], mode="L").save(out / name / f"{k}.png")
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, nargs="?", default=Path("examples/data/fashion_mnist"),
                   help="where to write the folders (default: examples/data/fashion_mnist, the example's data.path)")
    p.add_argument("--per-class", type=int, default=400, help="training images per class")
    p.add_argument("--test-per-class", type=int, default=100, help="test images per class (from the official test set)")
    args = p.parse_args(argv)
    if not (SOURCE / "train-images-idx3-ubyte.gz").is_file():
        print(f"Fashion-MNIST not found in {SOURCE}: apt-get install dataset-fashion-mnist", file=sys.stderr)
        return 2
    shutil.rmtree(args.out, ignore_errors=True)
    train = write_split(args.out / "train", read_idx(SOURCE / "train-images-idx3-ubyte.gz"),
                        read_idx(SOURCE / "train-labels-idx1-ubyte.gz"), args.per_class, seed=0)
    test = write_split(args.out / "test", read_idx(SOURCE / "t10k-images-idx3-ubyte.gz"),
                       read_idx(SOURCE / "t10k-labels-idx1-ubyte.gz"), args.test_per_class, seed=1)
    print(f"wrote {train} training and {test} test images (28x28 greyscale PNG) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
