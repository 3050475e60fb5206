"""clcalib: block-reconstruction post-training quantization with contrastive calibration.

Public surface (pinned by tests/test_public_api.py)::

    calibrate(model, calibration_data, config, on_progress) -> CalibrationResult
    load_quantized(path) -> model (header in model.header);  save_quantized(...)
    CalibConfig, Method, Preprocess, ClCalib, PdQuant, ProgressEvent
    CalibrationError, ConfigError, ModelMismatchError (UnsupportedModel), DataError, ExportError, Canceled

Importing ``clcalib`` or ``clcalib.config`` does not import torch (the API process relies on
it); the torch-backed names load on first use.
"""

from clcalib.config import CalibConfig, ClCalib, Method, PdQuant, Preprocess
from clcalib.errors import (
    CalibrationError,
    Canceled,
    ConfigError,
    DataError,
    ExportError,
    ModelMismatchError,
    UnsupportedModel,
)
from clcalib.progress import ProgressEvent

__version__ = "0.1.0"

_LAZY = {
    "calibrate": "clcalib.calibration",
    "CalibrationResult": "clcalib.calibration",
    "load_quantized": "clcalib.export",
    "save_quantized": "clcalib.export",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clcalib' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, the lazily imported ones included (``dir(clcalib)`` lists ``calibrate``)."""
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CalibConfig", "CalibrationError", "CalibrationResult", "Canceled", "ClCalib", "ConfigError",
    "DataError", "ExportError", "Method", "ModelMismatchError", "PdQuant", "Preprocess",
    "ProgressEvent", "UnsupportedModel", "calibrate", "load_quantized", "save_quantized",
]
