"""Calibrate -> export -> reload -> evaluate -> report: the one path the CLI and the worker share.

(STUB: signature fixed, body being written by the library issue.)
"""

from __future__ import annotations

from pathlib import Path

from clcalib.config import CalibConfig
from clcalib.progress import ProgressCallback

CHECKPOINT_NAME = "quantized.safetensors"
REPORT_NAME = "report.json"


def run_calibration(
    *,
    arch: str,
    num_classes: int,
    weights: str | Path,
    calibration: str | Path,
    config: CalibConfig,
    out_dir: str | Path,
    evaluation: str | Path | None = None,
    on_progress: ProgressCallback | None = None,
    resume_dir: str | Path | None = None,
) -> dict:
    """Writes out_dir/quantized.safetensors and out_dir/report.json (each atomically) and
    returns the report dict. ``resume_dir`` keeps per-unit state so a rerun with the same
    inputs continues after the last fully reconstructed unit. ``on_progress`` may raise
    ``clcalib.errors.Canceled`` to stop between iterations. Raises only CalibrationError
    subclasses for bad inputs."""
    raise NotImplementedError
