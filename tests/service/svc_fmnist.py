"""The service tests' view of the shared Fashion-MNIST helpers (clcalib.testing) and their
job configs."""

from __future__ import annotations

from pathlib import Path

from clcalib import testing as fmnist
from clcalib.testing import FMNIST, PREPROCESS, png, read_idx  # noqa: F401  (re-exported for the tests)

REFERENCE = fmnist.REFERENCE / "fmnist_resnet18.safetensors"
MOBILENET = fmnist.REFERENCE / "fmnist_mobilenet_v2.safetensors"
TINY = {"method": "qdrop", "w_bits": 4, "a_bits": 4, "iters": 2, "calib_size": 256,
        "batch_size": 32, "preprocess": PREPROCESS}
# jobs that only need to run (not the end-to-end accuracy check): the smaller reference model
# and 64 calibration images, a few seconds each on one thread
FAST = {**TINY, "method": "brecq", "calib_size": 64}
# a reference resnet18 job run end to end (checkpoint, report, download): 64 of the archive's 256
# images, 9 s instead of 16 s on one thread; TINY itself stays whole where the set's size matters
TINY_RUN = {**TINY, "calib_size": 64}


def write_zip(dest: Path, split: str, n: int, by_class: bool, start: int = 0) -> Path:
    """PNGs of images start..start+n of ``split`` ('train' or 't10k')."""
    return fmnist.write_zip(dest, split, range(start, start + n), by_class)
