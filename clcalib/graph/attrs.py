"""What a torch.fx ``get_attr`` node names, read from its module: shared by the partitioner's
graph rewriting (``units``) and the ONNX exporter (``export.onnx_qdq``)."""

from __future__ import annotations

from torch import nn


def fetch_attr(module: nn.Module, target: str):
    """The attribute at a dotted path (a parameter, buffer or constant tensor of a submodule)."""
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
