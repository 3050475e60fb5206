"""ONNX for the functional ATen ops a graph-path model runs between its layers (CNN glue,
squeeze-excitation, LayerNorm, GroupNorm, GELU, attention, reshapes, average pooling, padding,
splits and slices, the functional form of in-place slice writes).

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
from clcalib.export.onnx_ops import Value, adaptive_avg_pool, flatten, mean
from clcalib.export.onnx_ops import add as _add_tensors

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
    """Two tensors: the residual add integer kernels take (onnx_ops.add); sizes or a constant: Add."""
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
    mask_node = g.current.kwargs.get("attn_mask", g.current.args[3] if len(g.current.args) > 3 else None)
    meta = mask_node.meta.get("tensor_meta") if isinstance(mask_node, torch.fx.Node) else None
    float_mask = isinstance(attn_mask, Value) and meta is not None and meta.dtype == torch.float32
    if (attn_mask is not None and not float_mask) or is_causal or dropout_p or enable_gqa:
        raise ExportError(f"{hint}: attention with a boolean mask, causal masking, dropout or grouped heads is not "
                          "exported (an additive float mask, a relative-position bias, is)")
    dim = g.shape_of(0, hint)[-1]
    s = g.const(hint + ".scale", np.array(scale if scale is not None else 1.0 / math.sqrt(dim), np.float32))
    rank = _rank(g, hint)
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    kt = g.op("Transpose", [k.name], hint + ".kt", perm=perm)
    logits = g.op("Mul", [g.op("MatMul", [q.name, kt], hint + ".qk"), s], hint + ".scaled")
    if float_mask:  # CoAtNet's / MaxViT's relative-position bias, added to the scaled logits
        logits = g.op("Add", [logits, attn_mask.name], hint + ".bias")
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


_INT64_MAX = 2**63 - 1


def _bound(g, v, default: int, hint: str) -> str:
    """A Slice start/end: a Python int (None: ``default``) or a run-time Size."""
    if isinstance(v, Size):
        return v.name
    if v is None:
        v = default
    if not isinstance(v, int):
        raise ExportError(f"{hint}: a slice bound of type {type(v).__name__} is not exported")
    return g.const(hint + ".bound", np.array([min(v, _INT64_MAX)], np.int64))


def _slice_op(g, x: Value, dim: int, start, end, step: int, hint: str) -> str:
    if not isinstance(step, int) or step < 1:
        raise ExportError(f"{hint}: a slice with step {step!r} is not exported")
    axes = g.const(hint + ".axes", np.array([dim], np.int64))
    steps = g.const(hint + ".steps", np.array([step], np.int64))
    return g.op("Slice", [x.name, _bound(g, start, 0, hint), _bound(g, end, _INT64_MAX, hint), axes, steps], hint)


def _slice(g, x: Value, dim=0, start=None, end=None, step=1, *, hint: str) -> Value:
    if start in (None, 0) and (end is None or (isinstance(end, int) and end >= 2**62)) and step == 1:
        return x  # x[:, :]: the whole dimension
    return Value(_slice_op(g, x, dim, start, end, step, hint))


def _slice_scatter(g, x: Value, src: Value, dim=0, start=None, end=None, step=1, *, hint: str) -> Value:
    """``x`` with ``x[start:end]`` along ``dim`` replaced by ``src``: the parts before and after, and
    ``src`` between them, concatenated (a step of 1 only: the in-place ``out[:, :c] = ...`` form)."""
    if step != 1 or not isinstance(start, (int, type(None))) or not isinstance(end, (int, type(None))):
        raise ExportError(f"{hint}: slice_scatter with step {step} or run-time bounds is not exported")
    size = g.shape_of(0, hint)[dim]
    lo = 0 if start is None else (start + size if start < 0 else min(start, size))
    hi = size if end is None else (end + size if end < 0 else min(end, size))
    parts = []
    if lo > 0:
        parts.append(_slice_op(g, x, dim, 0, lo, 1, hint + ".before"))
    parts.append(src.name)
    if hi < size:
        parts.append(_slice_op(g, x, dim, hi, size, 1, hint + ".after"))
    if len(parts) == 1:
        return src
    return Value(g.op("Concat", parts, hint, axis=dim))


def _copy(g, x: Value, src: Value, non_blocking=False, *, hint: str) -> Value:
    """``copy(x, src)``: ``src`` in ``x``'s shape (the functional form of ``x[...] = src``)."""
    if not isinstance(src, Value):
        raise ExportError(f"{hint}: copy of a constant is not exported")
    return Value(g.op("Expand", [src.name, g.op("Shape", [x.name], hint + ".shape")], hint))


def _split_sizes(g, x: Value, sizes, dim: int, hint: str) -> list[Value]:
    out, at = [], 0
    for n in sizes:
        out.append(Value(_slice_op(g, x, dim, at, at + n, 1, f"{hint}.{len(out)}")))
        at += n
    return out


def _split(g, x: Value, split_size: int, dim=0, *, hint: str) -> list[Value]:
    size = g.shape_of(0, hint)[dim]
    return _split_sizes(g, x, [min(split_size, size - at) for at in range(0, size, split_size)], dim, hint)


def _split_with_sizes(g, x: Value, split_sizes, dim=0, *, hint: str) -> list[Value]:
    return _split_sizes(g, x, list(split_sizes), dim, hint)


def _chunk(g, x: Value, chunks: int, dim=0, *, hint: str) -> list[Value]:
    size = g.shape_of(0, hint)[dim]
    return _split(g, x, -(-size // chunks), dim, hint=hint)


def _unbind(g, x: Value, dim=0, *, hint: str) -> list[Value]:
    n = g.shape_of(0, hint)[dim]
    return [Value(g.op("Gather", [x.name, g.const(f"{hint}.{i}", np.array(i, np.int64))], f"{hint}.{i}", axis=dim))
            for i in range(n)]


def _getitem(g, items, index, *, hint: str):
    if not isinstance(items, (list, tuple)) or not isinstance(index, int):
        raise ExportError(f"{hint}: indexing a {type(items).__name__} is not exported")
    return items[index]


def _avg_pool(g, x: Value, kernel, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
              divisor_override=None, *, hint: str) -> Value:
    if divisor_override is not None:
        raise ExportError(f"{hint}: avg_pool2d with divisor_override is not exported")
    pair = nn.modules.utils._pair
    k, p = pair(kernel), pair(padding)
    s = pair(stride) if stride else k
    return Value(g.op("AveragePool", [x.name], hint, kernel_shape=list(k), strides=list(s), pads=list(p) * 2,
                      ceil_mode=int(ceil_mode), count_include_pad=int(count_include_pad)))


def _constant_pad(g, x: Value, pad, value=0.0, *, hint: str) -> Value:
    """torch's pad list runs from the last dimension, (begin, end) pairs; ONNX's: all begins, then all ends."""
    rank = _rank(g, hint)
    if len(pad) % 2 or len(pad) // 2 > rank or not all(isinstance(v, int) for v in pad):
        raise ExportError(f"{hint}: padding {pad} is not exported")
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    pads = g.const(hint + ".pads", np.array(begins + ends, np.int64))
    fill = g.const(hint + ".value", np.array(value, np.float32))
    return Value(g.op("Pad", [x.name, pads, fill], hint, mode="constant"))


def _pad(g, x: Value, pad, mode="constant", value=None, *, hint: str) -> Value:
    if mode != "constant":
        raise ExportError(f"{hint}: {mode} padding is not exported; only constant padding")
    return _constant_pad(g, x, pad, 0.0 if value is None else value, hint=hint)


def _group_norm(g, x: Value, groups: int, weight=None, bias=None, eps=1e-5, cudnn_enabled=True, *, hint: str) -> Value:
    """(x - mean) / sqrt(var + eps) over each group of channels and all positions, then the
    per-channel affine; written out, since not every runtime has GroupNormalization-21."""
    shape = g.shape_of(0, hint)
    grouped = g.op("Reshape", [x.name, g.const(hint + ".gshape", np.array([0, groups, -1], np.int64))], hint + ".g")
    axes = g.const(hint + ".axes", np.array([2], np.int64))
    mean = g.op("ReduceMean", [grouped, axes], hint + ".mean", keepdims=1)
    centred = g.op("Sub", [grouped, mean], hint + ".centred")
    var = g.op("ReduceMean", [g.op("Mul", [centred, centred], hint + ".sq"), axes], hint + ".var", keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.const(hint + ".eps", np.array(eps, np.float32))], hint + ".veps")],
               hint + ".std")
    y = g.op("Div", [centred, std], hint + ".norm")
    back = _ints(g, [_size(g, x, 0, hint=hint + ".n"), *shape[1:]], hint + ".back")
    y = g.op("Reshape", [y, back], hint + ".y")
    per_channel = [shape[1]] + [1] * (len(shape) - 2)
    if isinstance(weight, Value):
        y = g.op("Mul", [y, g.op("Reshape", [weight.name, g.const(hint + ".wshape", np.array(per_channel, np.int64))],
                                 hint + ".w")], hint + ".scaled")
    if isinstance(bias, Value):
        y = g.op("Add", [y, g.op("Reshape", [bias.name, g.const(hint + ".bshape", np.array(per_channel, np.int64))],
                                 hint + ".b")], hint + ".shifted")
    return Value(y)


def _batch_norm(g, x: Value, weight, bias, mean: Value, var: Value, momentum=0.1, eps=1e-5, *, hint: str):
    """A BatchNorm no conv was fused with (DenseNet's pre-activation): ONNX BatchNormalization."""
    c = g.shape_of(0, hint)[1]
    w = weight.name if isinstance(weight, Value) else g.const(hint + ".scale", np.ones(c, np.float32))
    b = bias.name if isinstance(bias, Value) else g.const(hint + ".bias", np.zeros(c, np.float32))
    return (Value(g.op("BatchNormalization", [x.name, w, b, mean.name, var.name], hint, epsilon=float(eps))), None, None)


def _reduce(op_type: str):
    def fn(g, x: Value, dim=None, keepdim=False, *, dtype=None, hint: str) -> Value:
        if dim is None or dtype is not None:
            raise ExportError(f"{hint}: {op_type} over all dimensions or to another dtype is not exported")
        axes = g.const(hint + ".axes", np.array([dim] if isinstance(dim, int) else list(dim), np.int64))
        return Value(g.op(op_type, [x.name, axes], hint, keepdims=int(keepdim)))

    return fn


def _clamp(g, x: Value, lo=None, hi=None, *, hint: str) -> Value:
    ins = [x.name, g.const(hint + ".lo", np.array(lo, np.float32)) if lo is not None else ""]
    if hi is not None:
        ins.append(g.const(hint + ".hi", np.array(hi, np.float32)))
    return Value(g.op("Clip", ins, hint))


def _pow(g, x: Value, exponent, *, hint: str) -> Value:
    if not isinstance(exponent, (int, float)):
        raise ExportError(f"{hint}: pow with a tensor exponent is not exported")
    return Value(g.op("Pow", [x.name, g.const(hint + ".exp", np.array(exponent, np.float32))], hint))


def _addmm(g, bias: Value, a: Value, b: Value, *, beta=1, alpha=1, hint: str) -> Value:
    if beta != 1 or alpha != 1:
        raise ExportError(f"{hint}: addmm with beta/alpha other than 1 is not exported")
    return Value(g.op("Add", [g.op("MatMul", [a.name, b.name], hint + ".mm"), bias.name], hint))


def _conv1d(g, x: Value, weight: Value, bias=None, stride=(1,), padding=(0,), dilation=(1,), groups=1, *,
            hint: str) -> Value:
    """A float Conv1d between layers (ECA's channel attention): clcalib quantizes Conv2d/Linear only."""
    if isinstance(padding, str):
        raise ExportError(f"{hint}: conv1d padding={padding!r} is not exported; use explicit padding")
    one = lambda v: list(v) if isinstance(v, (list, tuple)) else [v]  # noqa: E731
    ins = [x.name, weight.name] + ([bias.name] if isinstance(bias, Value) else [])
    return Value(g.op("Conv", ins, hint, strides=one(stride), pads=one(padding) * 2, dilations=one(dilation),
                      group=groups))


def _vector_norm(g, x: Value, ord=2, dim=None, keepdim=False, *, dtype=None, hint: str) -> Value:
    """ConvNeXt-V2's GRN: the L2 (or L1) norm over the given dims."""
    if ord not in (1, 2) or dim is None or dtype is not None:
        raise ExportError(f"{hint}: vector norm of order {ord} over {dim} is not exported; only L1/L2 over given dims")
    axes = g.const(hint + ".axes", np.array([dim] if isinstance(dim, int) else list(dim), np.int64))
    return Value(g.op("ReduceL2" if ord == 2 else "ReduceL1", [x.name, axes], hint, keepdims=int(keepdim)))


def _addcmul(g, x: Value, a: Value, b: Value, *, value=1, hint: str) -> Value:
    prod = g.op("Mul", [a.name, b.name], hint + ".prod")
    if value != 1:
        prod = g.op("Mul", [prod, g.const(hint + ".value", np.array(value, np.float32))], hint + ".scaled")
    return Value(g.op("Add", [x.name, prod], hint))


def _onnx_type(g, dtype, hint: str) -> int:
    TP = g.onnx.TensorProto
    types = {torch.float32: TP.FLOAT, torch.bool: TP.BOOL, torch.int64: TP.INT64, torch.int32: TP.INT32}
    if dtype not in types:
        raise ExportError(f"{hint}: dtype {dtype} is not exported")
    return types[dtype]


def _cumsum(g, x: Value, dim: int, *, dtype=None, hint: str) -> Value:
    if dtype is not None:
        x = Value(g.op("Cast", [x.name], hint + ".cast", to=_onnx_type(g, dtype, hint)))
    return Value(g.op("CumSum", [x.name, g.const(hint + ".axis", np.array(dim, np.int64))], hint))


def _zeros(g, size, *, dtype=None, layout=None, device=None, pin_memory=None, hint: str) -> Value:
    """EdgeNeXt's position-encoding mask, batch-sized: ConstantOfShape."""
    elem = _onnx_type(g, dtype or torch.float32, hint)
    value = g.onnx.helper.make_tensor(hint + ".zero", elem, [1], [0])
    return Value(g.op("ConstantOfShape", [_ints(g, list(size), hint)], hint, value=value))


def _to_copy(g, x: Value, *, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False,
             memory_format=None, hint: str) -> Value:
    return x if dtype is None else Value(g.op("Cast", [x.name], hint, to=_onnx_type(g, dtype, hint)))


def _stack(g, tensors, dim=0, *, hint: str) -> Value:
    axes = g.const(hint + ".axes", np.array([dim], np.int64))
    parts = [g.op("Unsqueeze", [t.name, axes], f"{hint}.{i}") for i, t in enumerate(tensors)]
    return Value(g.op("Concat", parts, hint, axis=dim))


def _index(g, x: Value, indices, *, hint: str) -> Value:
    """``x[..., idx]`` with one index tensor (a relative-position bias table looked up by its
    index buffer: Swin, CoAtNet, MaxViT): Gather along that dimension. Index buffers arrive as
    float initializers (whole numbers, exact below 2^24) and are cast back to int64."""
    used = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(used) != 1 or not isinstance(used[0][1], Value):
        raise ExportError(f"{hint}: indexing with {len(used)} index tensors is not exported; only one")
    dim, idx = used[0]
    as_int = g.op("Cast", [idx.name], hint + ".idx", to=g.onnx.TensorProto.INT64)
    return Value(g.op("Gather", [x.name, as_int], hint, axis=dim))


def _roll(g, x: Value, shifts, dims=(), *, hint: str) -> Value:
    """Swin's shifted windows: each roll as the tail and the head of the dimension, swapped."""
    shifts, dims = list(shifts), list(dims)
    if not dims or len(shifts) != len(dims) or not all(isinstance(v, int) for v in shifts + dims):
        raise ExportError(f"{hint}: roll over a flattened tensor or by run-time shifts is not exported")
    shape = g.shape_of(0, hint)
    for k, (shift, dim) in enumerate(zip(shifts, dims, strict=True)):
        size = shape[dim]
        if not isinstance(size, int):
            raise ExportError(f"{hint}: roll along a dimension of run-time size is not exported")
        cut = size - shift % size
        if cut in (0, size):
            continue
        tail = _slice_op(g, x, dim, cut, size, 1, f"{hint}.{k}.tail")
        head = _slice_op(g, x, dim, 0, cut, 1, f"{hint}.{k}.head")
        x = Value(g.op("Concat", [tail, head], f"{hint}.{k}", axis=dim))
    return x


def _upsample_nearest(g, x: Value, output_size=None, scale_factors=None, *, hint: str) -> Value:
    """torch's nearest: source index floor(i * in / out), ONNX Resize's asymmetric + floor."""
    shape = g.shape_of(0, hint)
    if output_size is not None and all(isinstance(v, int) for v in output_size):
        scales = [output_size[i] / shape[2 + i] for i in range(2)]
    elif scale_factors is not None:
        scales = [float(v) for v in scale_factors]
    else:
        raise ExportError(f"{hint}: nearest upsampling to a run-time size is not exported")
    sc = g.const(hint + ".scales", np.array([1.0, 1.0, *scales], np.float32))
    return Value(g.op("Resize", [x.name, "", sc], hint, mode="nearest", coordinate_transformation_mode="asymmetric",
                      nearest_mode="floor"))


def _upsample_bilinear(g, x: Value, output_size=None, align_corners=False, scale_factors=None, *, hint: str) -> Value:
    """MobileViT's resize back to the feature map: ONNX Resize, linear, half-pixel (or align-corners)."""
    shape = g.shape_of(0, hint)
    if output_size is not None and all(isinstance(v, int) for v in output_size):
        sizes = _ints(g, [_size(g, x, 0, hint=hint + ".n"), shape[1], *output_size], hint + ".sizes")
        return Value(g.op("Resize", [x.name, "", "", sizes], hint, mode="linear",
                          coordinate_transformation_mode="align_corners" if align_corners else "half_pixel"))
    if scale_factors is None:
        raise ExportError(f"{hint}: bilinear resizing to a run-time size is not exported")
    sc = g.const(hint + ".scales", np.array([1.0, 1.0, *map(float, scale_factors)], np.float32))
    return Value(g.op("Resize", [x.name, "", sc], hint, mode="linear",
                      coordinate_transformation_mode="align_corners" if align_corners else "half_pixel"))


def _leaky_relu(g, x: Value, negative_slope=0.01, *, hint: str) -> Value:
    return Value(g.op("LeakyRelu", [x.name], hint, alpha=float(negative_slope)))


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
    aten.max_pool2d.default: _max_pool, aten.adaptive_avg_pool2d.default: adaptive_avg_pool,
    aten.mean.dim: mean, aten.flatten.using_ints: flatten,
    aten.view.default: _reshape, aten.reshape.default: _reshape, aten.sym_size.int: _size,
    aten.reshape_as.default: lambda g, x, other, *, hint: Value(
        g.op("Reshape", [x.name, g.op("Shape", [other.name], hint + ".shape")], hint)),
    aten.permute.default: _permute, aten.transpose.int: _transpose, aten.cat.default: _cat,
    aten.expand.default: _expand, aten.select.int: _select, aten.slice.Tensor: _slice,
    aten.unsqueeze.default: _axes_op("Unsqueeze"), aten.squeeze.dim: _axes_op("Squeeze"),
    aten.clone.default: lambda g, x, memory_format=None, *, hint: x,
    aten.layer_norm.default: _layer_norm, aten.scaled_dot_product_attention.default: _sdpa,
    aten.softmax.int: _softmax,
    # timm's zoo (bench/zoo.py): ResNet-D's average-pool shortcut, GhostNet's in-place channel slices,
    # timm attention's unbind, MobileViT's split, PoolFormer's GroupNorm, DenseNet's lone BatchNorm
    aten.avg_pool2d.default: _avg_pool, aten.slice_scatter.default: _slice_scatter, aten.copy.default: _copy,
    aten.unbind.int: _unbind, aten.split.Tensor: _split, aten.split_with_sizes.default: _split_with_sizes,
    aten.chunk.default: _chunk, operator.getitem: _getitem,
    aten.constant_pad_nd.default: _constant_pad, aten.pad.default: _pad, aten.group_norm.default: _group_norm,
    aten._native_batch_norm_legit_no_training.default: _batch_norm,
    aten.sum.dim_IntList: _reduce("ReduceSum"), aten.amax.default: _reduce("ReduceMax"),
    aten.hardsigmoid.default: lambda g, x, *, hint: Value(g.op("HardSigmoid", [x.name], hint, alpha=1 / 6, beta=0.5)),
    aten.leaky_relu.default: _leaky_relu, aten.conv1d.default: _conv1d,
    aten.zeros.default: _zeros, aten._to_copy.default: _to_copy, aten.stack.default: _stack,
    aten.clamp_min.default: lambda g, x, lo, *, hint: _clamp(g, x, lo, None, hint=hint),
    aten.upsample_bilinear2d.vec: _upsample_bilinear,
    aten.index.Tensor: _index, aten.roll.default: _roll, aten.upsample_nearest2d.vec: _upsample_nearest,
    aten._unsafe_view.default: _reshape,
    aten.linalg_vector_norm.default: _vector_norm, aten.addcmul.default: _addcmul, aten.cumsum.default: _cumsum,
    aten.sin.default: _unary("Sin"), aten.cos.default: _unary("Cos"), aten.bitwise_not.default: _unary("Not"), aten.mish.default: _unary("Mish"),
    aten.clamp.default: _clamp, aten.pow.Tensor_Scalar: _pow, aten.sqrt.default: _unary("Sqrt"),
    aten.rsqrt.default: lambda g, x, *, hint: Value(g.op("Reciprocal", [g.op("Sqrt", [x.name], hint + ".sqrt")], hint)),
    aten.neg.default: _unary("Neg"), aten.exp.default: _unary("Exp"), aten.abs.default: _unary("Abs"),
    aten.erf.default: _unary("Erf"), aten.reciprocal.default: _unary("Reciprocal"),
    aten.bmm.default: _binary("MatMul"), aten.mm.default: _binary("MatMul"), aten.addmm.default: _addmm,
    aten.t.default: lambda g, x, *, hint: Value(g.op("Transpose", [x.name], hint, perm=[1, 0])),
    aten.alias.default: lambda g, x, *, hint: x, aten.squeeze.dims: _axes_op("Squeeze"),
}
