"""The torch.fx view of a converted model: QuantLayer and ActQuantizer stay whole (leaves), so
the graph says which activation quantizer feeds which layer, and the ONNX export walks it."""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from clcalib.errors import UnsupportedModel
from clcalib.graph.units import ON_GRID_OPS
from clcalib.quant.activation import ActQuantizer
from clcalib.quant.layer import QuantLayer


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantLayer, ActQuantizer)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as e:  # data-dependent control flow, Python the tracer cannot follow
        raise UnsupportedModel(f"the model cannot be traced: {str(e).splitlines()[0]}") from None


# ops that leave every value on the grid of the quantizer before them (what ONNX Runtime's QDQ
# propagation moves a Q/DQ pair across)
_ON_GRID_MODULES = (nn.Identity, nn.Dropout, nn.MaxPool2d, nn.Flatten)
_ON_GRID_FUNCTIONS = {torch.flatten, torch.nn.functional.dropout, operator.getitem, *ON_GRID_OPS}
_RELU_FUNCTIONS = {torch.nn.functional.relu, torch.ops.aten.relu.default}
_ON_GRID_METHODS = {"flatten", "view", "reshape"}


def _grid_source(node: fx.Node, mods: dict[str, nn.Module]) -> ActQuantizer | None:
    """The activation quantizer whose codes ``node``'s value still is, if any."""
    if node.op == "call_module":
        m = mods[node.target]
        if isinstance(m, ActQuantizer):
            return m
        if isinstance(m, QuantLayer):
            return m.out_quant
        on_grid, relu = isinstance(m, _ON_GRID_MODULES), isinstance(m, nn.ReLU)
    elif node.op == "call_function":
        on_grid, relu = node.target in _ON_GRID_FUNCTIONS, node.target in _RELU_FUNCTIONS
    elif node.op == "call_method":
        on_grid, relu = node.target in _ON_GRID_METHODS, node.target == "relu"
    else:
        return None
    if not (on_grid or relu) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = _grid_source(node.args[0], mods)
    # a ReLU keeps codes on the grid only where they are all >= 0 already (zero point 0)
    return None if relu and (src is None or not src.nonnegative) else src


def input_quantizers(model: nn.Module) -> dict[QuantLayer, ActQuantizer | None]:
    """For each QuantLayer, the activation quantizer its input comes from unchanged (through
    pooling by max, flattening, dropout, identity), or None (e.g. the first layer's FP image)."""
    graph = trace(model)
    mods = dict(model.named_modules())
    out: dict[QuantLayer, ActQuantizer | None] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], QuantLayer):
            layer, arg = mods[node.target], node.args[0]
            if layer.in_quant is not None:
                out[layer] = layer.in_quant
            else:
                out[layer] = _grid_source(arg, mods) if isinstance(arg, fx.Node) else None
    return out


@torch.no_grad()
def snap_biases(model: nn.Module) -> int:
    """Round each layer's bias to the INT32 grid of (input scale x weight scale), where its input
    is quantized: integer runtimes keep biases so (ONNX Runtime rewrites a float bias this way
    itself), so the torch model, the checkpoint and the ONNX file then compute the same thing.
    Returns the number of layers snapped."""
    n = 0
    for layer, q in input_quantizers(model).items():
        if q is None or not q.initialized:
            continue
        scale = q.step_size().detach().float() * layer.wq.scale.reshape(-1).float()
        codes = torch.round(layer.bias.float() / scale)
        if bool((codes.abs() < 2**31 - 1).all()):
            layer.bias = codes * scale
            n += 1
    return n
