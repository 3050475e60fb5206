"""The reference data of the test suite and the benchmarks (calibration never imports it):
real Fashion-MNIST images from Debian's IDX files (package dataset-fashion-mnist), written as
PNG folders/zips the way a user would upload them, and where the reference checkpoints are."""

from __future__ import annotations

import gzip
import io
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

# Debian's package; $CLCALIB_FMNIST_DIR for a machine without it (the device carry holds a subset)
FMNIST = Path(os.environ.get("CLCALIB_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
# the shared reference checkpoints: $CLCALIB_REFERENCE_DIR, else ../shared/reference beside the
# checkout, else /work/shared/reference (where this project's machines keep them)
def _reference_dir() -> Path:
    for cand in (os.environ.get("CLCALIB_REFERENCE_DIR"), Path(__file__).resolve().parents[2] / "shared" / "reference",
                 "/work/shared/reference"):
        if cand and (Path(cand) / "fmnist_resnet18.safetensors").is_file():
            return Path(cand)
    return Path(__file__).resolve().parents[2] / "shared" / "reference"


REFERENCE = _reference_dir()
# the reference models' preprocessing: 28x28 gray -> RGB, no resize or crop
PREPROCESS = {"resize": None, "crop": None, "mean": [0.286], "std": [0.353]}


def require_dataset() -> None:
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {FMNIST}; install it with: apt-get install -y dataset-fashion-mnist"
        )


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def split(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28 uint8, labels N) of 'train' or 't10k'."""
    require_dataset()
    return read_idx(FMNIST / f"{name}-images-idx3-ubyte.gz"), read_idx(FMNIST / f"{name}-labels-idx1-ubyte.gz")


def png(img: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(img, mode="L").save(b, format="PNG")
    return b.getvalue()


def calibration_indices(n: int, seed: int = 0, total: int = 60000) -> np.ndarray:
    """A fixed random choice of train images (the papers' protocol: 1024, seed 0)."""
    return np.sort(np.random.default_rng(seed).permutation(total)[:n])


def write_zip(dest: Path, name: str, indices, by_class: bool) -> Path:
    """PNGs of the chosen images of split ``name``; ``by_class``: in folders named by label."""
    images, labels = split(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as z:
        for i in indices:
            z.writestr(f"{labels[i]}/{i:05d}.png" if by_class else f"{i:05d}.png", png(images[i]))
    return dest


def process_state(pid: int) -> str:
    """A process's state letter from /proc ("Z": a zombie), "" once it is gone; never waits for it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return ""


def run_cli(*args, process: bool = False, timeout: float = 600):
    """``clcalib ARGS`` as a CompletedProcess (returncode, stdout, stderr). By default ``main()``
    runs in this process with its output captured: the CLI's whole code path without a fresh
    interpreter importing torch each time (5 s on a 2-core machine). ``process=True``: a real
    ``python -m clcalib.cli`` (one thread, a bare environment), for what only a process shows."""
    import subprocess
    import sys

    argv = [str(a) for a in args]
    if process:
        return subprocess.run([sys.executable, "-m", "clcalib.cli", *argv], capture_output=True, text=True,
                              timeout=timeout, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    import contextlib
    import traceback

    import torch

    from clcalib.cli import main

    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: --help, --version, a usage error; sys.exit("a message")
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:  # what the interpreter would print, and its exit status
            traceback.print_exc()
            code = 1
        finally:
            torch.set_num_threads(threads)  # --threads changes the process's setting
    return subprocess.CompletedProcess(["clcalib", *argv], code, out.getvalue(), err.getvalue())
