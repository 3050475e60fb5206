"""Run an exported ONNX file in OpenVINO (CPU), as the openvino export target is checked: the
same images and the same agreement rule as ONNX Runtime (onnx_check.py). OpenVINO runs with its
defaults, as a user would (float parts in bf16 on CPUs that have it)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from clcalib.errors import ExportError
from clcalib.export.profiles import require_runtime


def compiled(path: str | Path, threads: int | None = None):
    require_runtime("openvino")
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    try:
        return ov.Core().compile_model(str(path), "CPU", config)
    except Exception as e:
        raise ExportError(f"{path}: OpenVINO cannot load the file ({str(e).splitlines()[0][:300]})") from None


class OpenVinoRunner:
    """Logits (float32, CPU) of the ONNX model at ``path`` in OpenVINO for one batch of images."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.request = compiled(path, threads).create_infer_request()

    def __call__(self, x: Tensor) -> Tensor:
        out = self.request.infer({0: x.detach().cpu().float().numpy()})
        return torch.from_numpy(next(iter(out.values())).copy())
