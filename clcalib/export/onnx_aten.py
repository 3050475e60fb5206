"""ONNX for the functional ATen ops a graph-path model runs between its layers (CNN glue,
squeeze-excitation, LayerNorm, GELU, attention, reshapes).

Sizes read from a tensor (the dynamic batch) become int64 ONNX tensors (``Size``), so a
reshape such as ``view(x, [batch * heads, tokens, dim])`` stays valid at any batch size.
Handlers that need a tensor's rank or last dimension read the shapes the exporter propagated
(``g.shape_of``). Anything else is refused by the exporter with the op's name.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from clcalib.errors import ExportError
from clcalib.export.onnx_qdq import Value, _adaptive_avg_pool, _flatten, _mean
from clcalib.export.onnx_qdq import _add as _add_tensors

aten = torch.ops.aten


@dataclass(frozen=True)
class Size(Value):
    """A 1-element int64 tensor holding a size computed at run time."""


def _ints(g, items, hint: str, *, broadcast_minus_one: bool = False) -> str:
    """A 1-D int64 shape tensor from Python ints and Sizes (a constant when all are ints)."""
    if all(isinstance(d, int) for d in items):
        vals = [1 if (broadcast_minus_one and d == -1) else d for d in items]
        return g.const(hint + ".shape", np.array(vals, np.int64))
    parts = []
    for d in items:
        if isinstance(d, Size):
            parts.append(d.name)
        elif isinstance(d, int):
            parts.append(g.const(hint + ".dim", np.array([1 if (broadcast_minus_one and d == -1) else d], np.int64)))
        else:
            raise ExportError(f"{hint}: a shape entry of type {type(d).__name__} is not exported")
    return g.op("Concat", parts, hint + ".shape", axis=0)


def _as_operand(g, v, hint: str, like: Value | None = None) -> str:
    if isinstance(v, Value):
        return v.name
    if isinstance(v, (int, float)):
        dtype = np.int64 if isinstance(like, Size) else np.float32
        return g.const(hint + ".c", np.array([v] if isinstance(like, Size) else v, dtype))
    raise ExportError(f"{hint}: an operand of type {type(v).__name__} is not exported")


def _binary(op_type: str):
    def fn(g, a, b, *, hint: str):
        if not isinstance(a, Value) and not isinstance(b, Value):
            raise ExportError(f"{hint}: {op_type} of two constants is not exported")
        like = a if isinstance(a, Value) else b
        out = g.op(op_type, [_as_operand(g, a, hint, like), _as_operand(g, b, hint, like)], hint)
        return Size(out) if isinstance(like, Size) else Value(out)

    return fn


def _add(g, a, b, *, hint: str) -> Value:
    """Two tensors: the residual add integer kernels take (onnx_qdq._add); sizes or a constant: Add."""
    if type(a) is Value and type(b) is Value:
        return _add_tensors(g, a, b, hint=hint)
    return _binary("Add")(g, a, b, hint=hint)


def _size(g, x: Value, dim: int, *, hint: str) -> Size:
    return Size(g.op("Shape", [x.name], hint, start=dim, end=dim + 1))


def _reshape(g, x: Value, shape, *, hint: str) -> Value:
    return Value(g.op("Reshape", [x.name, _ints(g, list(shape), hint)], hint))


def _rank(g, hint: str, arg: int = 0) -> int:
    return len(g.shape_of(arg, hint))


def _permute(g, x: Value, dims, *, hint: str) -> Value:
    rank = _rank(g, hint)
    return Value(g.op("Transpose", [x.name], hint, perm=[d % rank for d in dims]))


def _transpose(g, x: Value, d0: int, d1: int, *, hint: str) -> Value:
    rank = _rank(g, hint)
    perm = list(range(rank))
    perm[d0 % rank], perm[d1 % rank] = perm[d1 % rank], perm[d0 % rank]
    return Value(g.op("Transpose", [x.name], hint, perm=perm))


def _max_pool(g, x: Value, kernel, stride=(), padding=0, dilation=1, ceil_mode=False, *, hint: str) -> Value:
    pair = nn.modules.utils._pair
    k, p, d = pair(kernel), pair(padding), pair(dilation)
    s = pair(stride) if stride else k
    return Value(g.op("MaxPool", [x.name], hint, kernel_shape=list(k), strides=list(s), pads=list(p) * 2,
                      dilations=list(d), ceil_mode=int(ceil_mode)))


def _hardtanh(g, x: Value, lo=-1.0, hi=1.0, *, hint: str) -> Value:
    if (lo, hi) == (0.0, 6.0):
        return g.activation(nn.ReLU6(), x, hint)
    a, b = g.const(hint + ".lo", np.array(lo, np.float32)), g.const(hint + ".hi", np.array(hi, np.float32))
    return Value(g.op("Clip", [x.name, a, b], hint))


def _silu(g, x: Value, *, hint: str) -> Value:
    return Value(g.op("Mul", [x.name, g.op("Sigmoid", [x.name], hint + ".sigmoid")], hint))


def _gelu(g, x: Value, approximate: str = "none", *, hint: str) -> Value:
    return Value(g.op("Gelu", [x.name], hint, approximate=approximate))


def _layer_norm(g, x: Value, shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True, *, hint: str) -> Value:
    w = weight.name if isinstance(weight, Value) else g.const(hint + ".scale", np.ones(shape, np.float32))
    ins = [x.name, w] + ([bias.name] if isinstance(bias, Value) else [])
    return Value(g.op("LayerNormalization", ins, hint, axis=-len(shape), epsilon=float(eps)))


def _sdpa(g, q: Value, k: Value, v: Value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False, *, hint: str) -> Value:
    if attn_mask is not None or is_causal or dropout_p or enable_gqa:
        raise ExportError(f"{hint}: attention with a mask, causal masking, dropout or grouped heads is not exported")
    dim = g.shape_of(0, hint)[-1]
    s = g.const(hint + ".scale", np.array(scale if scale is not None else 1.0 / math.sqrt(dim), np.float32))
    rank = _rank(g, hint)
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    kt = g.op("Transpose", [k.name], hint + ".kt", perm=perm)
    logits = g.op("Mul", [g.op("MatMul", [q.name, kt], hint + ".qk"), s], hint + ".scaled")
    attn = g.op("Softmax", [logits], hint + ".softmax", axis=-1)
    return Value(g.op("MatMul", [attn, v.name], hint))


def _cat(g, tensors, dim=0, *, hint: str) -> Value:
    return Value(g.op("Concat", [t.name for t in tensors], hint, axis=dim))


def _expand(g, x: Value, sizes, implicit=False, *, hint: str) -> Value:
    return Value(g.op("Expand", [x.name, _ints(g, list(sizes), hint, broadcast_minus_one=True)], hint))


def _select(g, x: Value, dim: int, index: int, *, hint: str) -> Value:
    return Value(g.op("Gather", [x.name, g.const(hint + ".index", np.array(index, np.int64))], hint, axis=dim))


def _axes_op(op_type: str):
    def fn(g, x: Value, dim, *, hint: str) -> Value:
        dims = [dim] if isinstance(dim, int) else list(dim)
        return Value(g.op(op_type, [x.name, g.const(hint + ".axes", np.array(dims, np.int64))], hint))

    return fn


def _slice(g, x: Value, dim=0, start=None, end=None, step=1, *, hint: str) -> Value:
    if start in (None, 0) and (end is None or end >= 2**62) and step == 1:
        return x  # x[:, :]: the whole dimension
    raise ExportError(f"{hint}: a partial slice is not exported")


def _softmax(g, x: Value, dim: int, half_to_float=False, *, hint: str) -> Value:
    return Value(g.op("Softmax", [x.name], hint, axis=dim))


def _unary(op_type: str):
    return lambda g, x, *, hint: Value(g.op(op_type, [x.name], hint))


ATEN_FUNCTIONS = {
    aten.add.Tensor: _add, aten.mul.Tensor: _binary("Mul"), aten.sub.Tensor: _binary("Sub"),
    aten.div.Tensor: _binary("Div"), aten.matmul.default: _binary("MatMul"),
    operator.mul: _binary("Mul"), operator.floordiv: _binary("Div"), operator.sub: _binary("Sub"),
    aten.relu.default: lambda g, x, *, hint: g.relu(x, hint), aten.hardtanh.default: _hardtanh,
    aten.silu.default: _silu, aten.gelu.default: _gelu, aten.sigmoid.default: _unary("Sigmoid"),
    aten.tanh.default: _unary("Tanh"), aten.hardswish.default: _unary("HardSwish"),
    aten.max_pool2d.default: _max_pool, aten.adaptive_avg_pool2d.default: _adaptive_avg_pool,
    aten.mean.dim: _mean, aten.flatten.using_ints: _flatten,
    aten.view.default: _reshape, aten.reshape.default: _reshape, aten.sym_size.int: _size,
    aten.permute.default: _permute, aten.transpose.int: _transpose, aten.cat.default: _cat,
    aten.expand.default: _expand, aten.select.int: _select, aten.slice.Tensor: _slice,
    aten.unsqueeze.default: _axes_op("Unsqueeze"), aten.squeeze.dim: _axes_op("Squeeze"),
    aten.clone.default: lambda g, x, memory_format=None, *, hint: x,
    aten.layer_norm.default: _layer_norm, aten.scaled_dot_product_attention.default: _sdpa,
    aten.softmax.int: _softmax,
}
