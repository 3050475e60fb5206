"""What both op tables of the ONNX exporter share: ``Value`` (an ONNX tensor name with what is
known of it) and the handlers of the ops that a module-traced model (``onnx_qdq``) and a
graph-path model (``onnx_aten``) both run: flatten, add, mean, global average pooling, dropout.

A handler takes the graph being built (``onnx_qdq``'s ``_Graph``), the op's arguments and a
``hint`` that names the ONNX nodes it writes; what it cannot translate faithfully it refuses
(ExportError naming the op)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clcalib.errors import ExportError

__all__ = ["Value", "adaptive_avg_pool", "add", "flatten", "mean", "no_training", "pool_is_global"]


@dataclass(frozen=True)
class Value:
    """An ONNX tensor name; ``dq``: a DequantizeLinear produced it (integer kernels can take it);
    ``nonnegative``: its zero point is 0, so the value is >= 0 and a ReLU on it is a no-op."""

    name: str
    dq: bool = False
    nonnegative: bool = False


def pool_is_global(size) -> bool:
    return size in (1, (1, 1), [1, 1])


def flatten(g, x: Value, start_dim=0, end_dim=-1, *, hint: str) -> Value:
    if start_dim != 1 or end_dim != -1:
        raise ExportError(f"{hint}: flatten({start_dim}, {end_dim}) is not exported; only flatten(x, 1)")
    return Value(g.op("Flatten", [x.name], hint, axis=1))


def add(g, a: Value, b: Value, *, hint: str) -> Value:
    if not (isinstance(a, Value) and isinstance(b, Value)):
        raise ExportError(f"{hint}: add with a constant is not exported")
    a, b = g.integer_input(a, hint), g.integer_input(b, hint)
    return Value(g.op("Add", [a.name, b.name], hint))


def mean(g, x: Value, dim=None, keepdim=False, *, hint: str) -> Value:
    if dim is None:
        raise ExportError(f"{hint}: mean over all dimensions is not exported; give the dims")
    axes = g.const(hint + ".axes", np.array([dim] if isinstance(dim, int) else list(dim), np.int64))
    return Value(g.op("ReduceMean", [x.name, axes], hint, keepdims=int(keepdim)))


def no_training(x: Value, training: bool, hint: str) -> Value:
    if training:
        raise ExportError(f"{hint}: dropout in training mode is random; export the model in eval mode")
    return x


def adaptive_avg_pool(g, x: Value, size, *, hint: str) -> Value:
    if not pool_is_global(size):
        raise ExportError(f"{hint}: adaptive_avg_pool2d to {size} is not exported; only to 1x1")
    return Value(g.op("GlobalAveragePool", [x.name], hint))
