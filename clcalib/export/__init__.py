"""What leaves clcalib: the safetensors checkpoint (``checkpoint``), its ONNX QDQ export
(``onnx_qdq``) and the ONNX Runtime check of that export (``onnx_check``)."""

from clcalib.export.checkpoint import (
    FORMAT,
    Storage,
    load_quantized,
    pack_bits,
    read_header,
    save_quantized,
    unpack_bits,
    versions,
)

__all__ = ["FORMAT", "Storage", "load_quantized", "pack_bits", "read_header", "save_quantized", "unpack_bits",
           "versions"]
