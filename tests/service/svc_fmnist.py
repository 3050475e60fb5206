"""Real Fashion-MNIST images as PNG archives, from Debian's IDX files."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

FMNIST = Path("/usr/share/datasets/fashion-mnist")
REFERENCE = Path("/work/shared/reference/fmnist_resnet18.safetensors")
PREPROCESS = {"resize": None, "crop": None, "mean": [0.286], "std": [0.353]}
TINY = {"method": "qdrop", "w_bits": 4, "a_bits": 4, "iters": 2, "calib_size": 256,
        "batch_size": 32, "preprocess": PREPROCESS}


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def png(img: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(img, mode="L").save(b, format="PNG")
    return b.getvalue()


def write_zip(dest: Path, split: str, n: int, by_class: bool, start: int = 0) -> Path:
    images = read_idx(FMNIST / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(FMNIST / f"{split}-labels-idx1-ubyte.gz")
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as z:
        for i in range(start, start + n):
            name = f"{labels[i]}/{i:05d}.png" if by_class else f"{i:05d}.png"
            z.writestr(name, png(images[i]))
    return dest

MOBILENET = Path("/work/shared/reference/fmnist_mobilenet_v2.safetensors")
# jobs that only need to run (not the end-to-end accuracy check): the smaller reference model
# and 64 calibration images, a few seconds each on one thread
FAST = {**TINY, "method": "brecq", "calib_size": 64}
