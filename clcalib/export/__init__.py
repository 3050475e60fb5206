"""What leaves clcalib: the safetensors checkpoint (``checkpoint``), its ONNX QDQ export
(``onnx_qdq``, laid out per runtime by ``profiles``) and the runtimes' check of that export
(``onnx_check``, ``openvino_check``).

The checkpoint's names load on first use (PEP 562): importing ``clcalib.export.profiles`` (the
export targets, read by the config and the CLI's parser) must not import torch, so that the API
process and ``clcalib --help`` stay light."""

from __future__ import annotations

import importlib

__all__ = ["FORMAT", "ModelSize", "load_quantized", "pack_bits", "read_header", "save_quantized", "unpack_bits",
           "versions"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("clcalib.export.checkpoint"), name)
    raise AttributeError(f"module 'clcalib.export' has no attribute {name!r}")
