"""ONNX export of a quantized model in QDQ form (the form ONNX Runtime's own ``quantize_static``
writes, and TensorRT / OpenVINO read).

- Weights: integer initializers (INT4 for 2-4 bits, INT8 for 5-7 bits, UINT8 for 8 bits),
  per-output-channel scale and zero point, feeding ``DequantizeLinear(axis=0)``. BatchNorm is
  already folded. Codes below 8 bits are stored shifted by 2^(bits-1) into the signed type (the
  zero point shifted alike), which leaves ``(code - zero) * scale`` unchanged and makes
  symmetric weights zero-point-0, as integer kernels want. 8-bit codes are stored as they are
  (uint8, symmetric zero point 128): ONNX Runtime's uint8 x int8 kernels on x86 CPUs without
  VNNI (AVX2, AVX-512 without VNNI) add two products in a saturating int16 (``vpmaddubsw``),
  which 8-bit signed weights overflow (255 x 128 x 2 > 32767; mobilenet_v2 W8A8 agreed with
  the torch model on 95 % of images there), while its uint8 x uint8 kernels widen to 16 bits
  first and are exact on every CPU. The price is on VNNI CPUs, where uint8 x int8 is exact and
  faster: a W8A8 file that runs almost all on integer kernels took 1.3-1.4x the time there.
  5-7-bit signed codes are at most 64 in magnitude, 255 x 64 x 2 = 32640 fits: they keep int8.
- Biases: float, as calibrated. (INT32 biases with scale = input x weight scale, as
  ``quantize_static`` writes them, moved 1e-3 of resnet18's W4A4 activations by a whole step
  and cost 1.5 % top-1 agreement with the torch model; ONNX Runtime fuses float-bias convs into
  QLinearConv all the same.)
- Activations: ``QuantizeLinear`` (uint8) -> ``Clip`` to the calibrated range [0, 2^bits - 1]
  when bits < 8 -> ``DequantizeLinear``, per tensor (the QCDQ form: 2-, 3-, 4-bit codes stay
  2-, 3-, 4-bit in an 8-bit container).

The graph comes from a torch.fx trace of the quantized model with QuantLayer and ActQuantizer
as leaves; every other node must be in the op tables below, anything else is refused with the
op's name (ExportError) rather than exported wrongly.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from clcalib.config import MAX_BITS, MIN_BITS
from clcalib.errors import ExportError, UnsupportedModel
from clcalib.export.onnx_aten import ATEN_FUNCTIONS
from clcalib.export.onnx_ops import (
    Value,
    adaptive_avg_pool,
    add,
    flatten,
    mean,
    no_training,
    pool_is_global,
)
from clcalib.export.profiles import DEFAULT, Profile, profile
from clcalib.graph.attrs import fetch_attr
from clcalib.graph.trace import trace
from clcalib.quant.activation import ActQuantizer
from clcalib.quant.layer import QuantLayer
from clcalib.quant.primitives import qmax_of, widen_to_8bit
from clcalib.quant.switch import quantization
from clcalib.quant.weight import WState

OPSET = 21  # the first opset with INT4/UINT4 in QuantizeLinear/DequantizeLinear
INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass(frozen=True)
class Codes:
    """An activation's uint8 QDQ: scale, zero point, and the top code (< 255: the narrower
    range of a low-bit quantizer or a folded ReLU6)."""

    scale: np.float32
    zero: int
    top: int = 255


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'clcalib[onnx]'") from None
    return onnx


class _Graph:
    def __init__(self, quantized: bool, profile: Profile, ranges: dict[str, tuple[float, float]] | None = None):
        self.onnx = _onnx()
        self.quantized = quantized
        self.profile = profile
        # integer profiles: the observed range of every float tensor, by fx node name, and which
        # node made each ONNX tensor (to requantize a float value an integer op takes)
        self.ranges = ranges or {}
        self.origin: dict[str, str] = {}
        self._requantized: dict[str, Value] = {}
        self.nodes: list = []
        self.inits: list = []
        self._n = 0
        self.current: fx.Node | None = None  # the fx node being translated (for its input shapes)

    def shape_of(self, arg: int, hint: str) -> tuple[int, ...]:
        """The propagated shape of the current node's ``arg``-th input."""
        node = self.current.args[arg] if self.current is not None and len(self.current.args) > arg else None
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        if meta is None:
            raise ExportError(f"{hint}: the shape of its input is unknown here")
        return tuple(meta.shape)

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint.replace('.', '_')}_{self._n}"

    def const(self, hint: str, array: np.ndarray, elem_type: int | None = None) -> str:
        """An initializer; ``elem_type`` INT4 packs two codes a byte, low nibble first."""
        h, TP = self.onnx.helper, self.onnx.TensorProto
        name = self.name(hint)
        if elem_type == TP.INT4:
            flat = (array.astype(np.int8).reshape(-1) & 0x0F).astype(np.uint8)
            if flat.size % 2:
                flat = np.append(flat, np.uint8(0))
            packed = flat[0::2] | (flat[1::2] << 4)
            self.inits.append(h.make_tensor(name, TP.INT4, array.shape, packed.tobytes(), raw=True))
        else:
            if elem_type in (TP.INT8, TP.UINT8):
                array = array.astype(np.int8 if elem_type == TP.INT8 else np.uint8)
            self.inits.append(self.onnx.numpy_helper.from_array(np.array(array, order="C"), name))  # 0-d stays 0-d
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.name(hint)
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    # --- quantization ------------------------------------------------------------------------
    def act_quant(self, x: Value, q: ActQuantizer, hint: str, clamp_max: float | None = None) -> Value:
        """The calibrated quantizer ``q`` as Q -> (Clip) -> DQ. ``clamp_max``: a ReLU6-style clamp
        before the quantizer, folded into the code range (exact when the zero point is 0, see
        ``layer``)."""
        if not self.quantized:
            return Value(x.name)
        if not q.initialized:
            raise ExportError(f"{hint}: activation quantizer has no calibrated range; calibrate first")
        _check_bits(q.bits, hint)
        scale = np.float32(q.step_size().item())
        zero = int(_codes(q.zero.detach().cpu().reshape(1), q.bits, hint + " zero point")[0])
        top = qmax_of(q.bits)
        if clamp_max is not None:  # round(min(x, c) / s) == min(round(x / s), round(c / s)): round is monotone
            top = min(top, int(np.round(np.float32(clamp_max) / scale)))
        if top < 255 and self.profile.activations == "8bit":  # the same clamp range on a finer grid
            widened, zero = widen_to_8bit(scale, zero, top)
            scale, top = np.float32(widened), 255
        return self.qdq(x, Codes(scale, zero, top), hint, clamp=True)

    def qdq(self, x: Value, c: Codes, hint: str, clamp: bool = False) -> Value:
        """QuantizeLinear (uint8) -> Clip to the top code when it is below 255 (the reference
        profile's narrow codes) -> DequantizeLinear. Profiles with symmetric activations get
        int8 codes with zero point 0 covering the same range, and first, where ``clamp`` says the
        quantizer's range is part of the model, its clamp in float (a ReLU when the range starts
        at 0): a symmetric range would let through what the calibrated one clips."""
        if self.profile.symmetric_activations:
            lo, hi = -c.zero * float(c.scale), (c.top - c.zero) * float(c.scale)
            if clamp and c.zero == 0:
                x = Value(self.op("Relu", [x.name], hint + ".floor"))
            elif clamp:
                bounds = [self.const(hint + ".lo", np.array(lo, np.float32)), self.const(hint + ".hi", np.array(hi, np.float32))]
                x = Value(self.op("Clip", [x.name, *bounds], hint + ".clamp"))
            s = self.const(hint + ".scale", np.array(max(abs(lo), hi, 1e-8) / 127.0, np.float32))
            z = self.const(hint + ".zero", np.array(0, np.int8))
            y = self.op("QuantizeLinear", [x.name, s, z], hint + ".q")
            return Value(self.op("DequantizeLinear", [y, s, z], hint + ".dq"), dq=True, nonnegative=clamp and c.zero == 0)
        s = self.const(hint + ".scale", np.array(c.scale, np.float32))
        z = self.const(hint + ".zero", np.array(c.zero, np.uint8))
        y = self.op("QuantizeLinear", [x.name, s, z], hint + ".q")
        if c.top < 255:
            lo = self.const(hint + ".qmin", np.array(0, np.uint8))
            hi = self.const(hint + ".qmax", np.array(c.top, np.uint8))
            y = self.op("Clip", [y, lo, hi], hint + ".clip")
        return Value(self.op("DequantizeLinear", [y, s, z], hint + ".dq"), dq=True, nonnegative=c.zero == 0)

    def integer_input(self, x: Value, hint: str) -> Value:
        """``x`` as an integer op's input: itself when a DequantizeLinear made it (or the profile
        keeps float between the calibrated quantizers), else an 8-bit QDQ with the range observed
        on the calibration images (once per tensor)."""
        if not (self.quantized and self.profile.integer_ops) or x.dq or type(x) is not Value:  # not a Size
            return x
        if x.name in self._requantized:
            return self._requantized[x.name]
        node = self.origin.get(x.name)
        if node not in self.ranges:
            raise ExportError(f"{hint}: export target {self.profile.name} writes its float input {node or x.name} as "
                              "8-bit codes and needs calibration images for the range; give them (clcalib export "
                              "--calib), or use target reference")
        lo, hi = self.ranges[node]
        self._requantized[x.name] = v = self.qdq(x, _uint8_codes(lo, hi), hint + ".in8")
        return v

    def weight(self, layer: QuantLayer, hint: str) -> str:
        wq = layer.wq
        if not self.quantized:
            return self.const(hint + ".weight", layer.weight.detach().cpu().float().numpy())
        if wq.state is not WState.INT:
            raise ExportError(f"{hint}: weights are in state {wq.state.value!r}, not integer codes; calibrate first")
        _check_bits(wq.bits, hint)
        TP = self.onnx.TensorProto
        elem, offset = _weight_type(TP, wq.bits, self.profile)
        zero = _codes(wq.zero.detach().cpu().reshape(-1), wq.bits, hint + " weight zero point") - offset
        codes = _codes(wq.q.detach().cpu(), wq.bits, hint + " weight codes") - offset
        q = self.const(hint + ".wq", codes, elem)
        z = self.const(hint + ".wzero", zero, elem)
        s = self.const(hint + ".wscale", wq.scale.detach().cpu().reshape(-1).numpy().astype(np.float32))
        return self.op("DequantizeLinear", [q, s, z], hint + ".w", axis=0)

    def layer(self, layer: QuantLayer, x: Value, hint: str) -> Value:
        if layer.in_quant is not None:
            x = self.act_quant(x, layer.in_quant, hint + ".in")
        x = self.integer_input(x, hint)
        w = self.weight(layer, hint)
        b = self.const(hint + ".bias", layer.bias.detach().cpu().float().numpy())
        if layer.is_conv:
            a = layer.conv_args
            pad = a["padding"]
            if isinstance(pad, str):
                raise ExportError(f"{hint}: padding={pad!r} is not exported; use explicit padding")
            y = self.op("Conv", [x.name, w, b], hint + ".conv", strides=list(a["stride"]), pads=list(pad) * 2,
                        dilations=list(a["dilation"]), group=a["groups"],
                        kernel_shape=list(layer.weight.shape[2:]))
        elif len(self.shape_of(0, hint)) != 2:  # tokens (N x L x C) or channels-last: MatMul + Add
            wt = self.op("Transpose", [w], hint + ".wt", perm=[1, 0])
            y = self.op("Add", [self.op("MatMul", [x.name, wt], hint + ".matmul"), b], hint + ".add")
        else:
            y = self.op("Gemm", [x.name, w, b], hint + ".gemm", transB=1)
        q = layer.out_quant
        if self.quantized and q is not None and q.nonnegative and type(layer.act) in (nn.ReLU, nn.ReLU6):
            # a quantizer with zero point 0 already maps x < 0 to code 0: the ReLU is in the
            # codes' range, and ReLU6's upper clamp becomes the top code (exact). Conv -> Q with
            # nothing between is what integer runtimes fuse into one integer conv.
            return self.act_quant(Value(y), q, hint + ".out", 6.0 if isinstance(layer.act, nn.ReLU6) else None)
        y = self.activation(layer.act, Value(y), hint)
        return self.act_quant(y, q, hint + ".out") if q is not None else y

    def activation(self, act: nn.Module, x: Value, hint: str) -> Value:
        if isinstance(act, nn.Identity):
            return x
        if isinstance(act, nn.ReLU6):
            lo = self.const(hint + ".lo", np.array(0, np.float32))
            hi = self.const(hint + ".hi", np.array(6, np.float32))
            return Value(self.op("Clip", [x.name, lo, hi], hint + ".relu6"))
        if isinstance(act, nn.ReLU):
            return self.relu(x, hint)
        raise ExportError(f"{hint}: activation {type(act).__name__} has no ONNX export here")

    def relu(self, x: Value, hint: str) -> Value:
        if x.nonnegative:
            return x  # dequantized codes with zero point 0 are already >= 0: the ReLU is a no-op
        return Value(self.op("Relu", [x.name], hint + ".relu"))


def _codes(t: torch.Tensor, bits: int, what: str) -> np.ndarray:
    """Integer codes as int32, refused unless whole numbers in [0, 2^bits - 1] (a damaged file)."""
    a = t.numpy().astype(np.float64)
    if not (np.all(a == np.round(a)) and a.min(initial=0) >= 0 and a.max(initial=0) <= qmax_of(bits)):
        raise ExportError(f"{what}: not integers in [0, {qmax_of(bits)}] for {bits} bits; the model is damaged")
    return a.astype(np.int32)


def _weight_type(TP, bits: int, profile: Profile) -> tuple[int, int]:
    """The ONNX type of ``bits``-bit weight codes and the offset subtracted from them (and their
    zero point) to fit it; see the module docstring and profiles.py for which and why."""
    if bits == 8 and not profile.signed_weights:
        return TP.UINT8, 0
    return (TP.INT4 if bits <= 4 and profile.packed_weights else TP.INT8), 1 << (bits - 1)


def _uint8_codes(lo: float, hi: float) -> Codes:
    """Asymmetric uint8 codes covering [lo, hi] and 0 (so that 0 and a ReLU's floor are exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = np.float32(max(hi - lo, 1e-8) / 255.0)
    return Codes(scale, int(np.clip(np.round(-lo / scale), 0, 255)))


def _check_bits(bits: int, where: str) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ExportError(f"{where}: {bits}-bit quantization cannot be exported; ONNX QDQ here takes "
                          f"{MIN_BITS} to {MAX_BITS} bits")


# --- the op tables: fx node -> ONNX (the ops shared with onnx_aten's table are in onnx_ops) ----
def _module(g: _Graph, m: nn.Module, args: list, hint: str) -> Value:
    x = args[0]
    if isinstance(m, QuantLayer):
        return g.layer(m, x, hint)
    if isinstance(m, ActQuantizer):
        return g.act_quant(x, m, hint)
    if isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and not m.training):
        return x
    if isinstance(m, (nn.ReLU, nn.ReLU6)):
        return g.activation(m, x, hint)
    if isinstance(m, nn.MaxPool2d):
        k, s, p, d = (torch.nn.modules.utils._pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation))
        return Value(g.op("MaxPool", [x.name], hint, kernel_shape=list(k), strides=list(s), pads=list(p) * 2,
                          dilations=list(d), ceil_mode=int(m.ceil_mode)))
    if isinstance(m, nn.AdaptiveAvgPool2d) and pool_is_global(m.output_size):
        return Value(g.op("GlobalAveragePool", [x.name], hint))
    if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
        return Value(g.op("Flatten", [x.name], hint, axis=1))
    raise ExportError(f"{hint}: module {type(m).__name__} has no ONNX export here")


_FUNCTIONS = {
    operator.add: add, operator.iadd: add, torch.add: add,
    torch.flatten: flatten, F.adaptive_avg_pool2d: adaptive_avg_pool,
    F.relu: lambda g, x, inplace=False, *, hint: g.relu(x, hint),
    F.dropout: lambda g, x, p=0.5, training=True, inplace=False, *, hint: no_training(x, training, hint),
}
_METHODS = {"flatten": flatten, "add": add, "mean": mean, "relu": lambda g, x, *, hint: g.relu(x, hint)}


def _call(fn, g: _Graph, args, kwargs, hint: str):
    try:
        return fn(g, *args, hint=hint, **kwargs)
    except TypeError:  # an argument form the table does not take (alpha=, out=, ...)
        raise ExportError(f"{hint}: this call's arguments have no ONNX export here: args {args}, kwargs "
                          f"{sorted(kwargs)}") from None


RANGE_IMAGES = 256  # calibration images whose float tensors give the integer profiles' 8-bit ranges


def observed_ranges(model: nn.Module, traced: fx.Graph, images: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Min and max of every float tensor of the quantized model over ``images``, by fx node name."""
    ranges: dict[str, tuple[float, float]] = {}

    class Observer(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
                lo, hi = float(out.min()), float(out.max())
                old = ranges.get(n.name, (lo, hi))
                ranges[n.name] = (min(lo, old[0]), max(hi, old[1]))
            return out

    gm = fx.GraphModule(model, traced)
    device = next(model.parameters()).device
    with torch.no_grad():
        for x in images[:RANGE_IMAGES].split(64):
            Observer(gm).run(x.float().to(device))
    return ranges


def float_ranges(model: nn.Module, images: torch.Tensor) -> dict[str, list[float]] | None:
    """The integer profiles' ranges of ``model``'s float tensors over the first calibration
    images, as the checkpoint stores them (``float_ranges``) so that a later export needs no
    images and writes the same file; None for a model the exporter cannot trace."""
    try:
        traced = trace(model)
    except UnsupportedModel:
        return None
    return {k: [lo, hi] for k, (lo, hi) in observed_ranges(model, traced, images).items()}


def _stored_ranges(model: nn.Module) -> dict[str, tuple[float, float]] | None:
    """The ranges a checkpoint stored (``load_quantized`` keeps its header on the model)."""
    import math

    stored = (getattr(model, "header", None) or {}).get("float_ranges")
    if stored is None:
        return None
    ok = isinstance(stored, dict) and all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)
        and v[0] <= v[1] for v in stored.values())
    if not ok:
        raise ExportError("the checkpoint's float_ranges are damaged (each must be [low, high], finite); give "
                          "calibration images (--calib) to measure them again")
    return {k: (float(v[0]), float(v[1])) for k, v in stored.items()}


def build_onnx(model: nn.Module, input_shape: tuple[int, ...], *, quantized: bool = True, name: str = "clcalib",
               target: str = DEFAULT, range_images: torch.Tensor | None = None):
    """The ONNX ModelProto of ``model`` (a QuantModel): QDQ written for the runtime ``target``
    (profiles.py), or with ``quantized=False`` plain FP32 from the layers' float weights
    (BatchNorm folded), for a like-for-like baseline. Integer targets need the ranges of the
    tensors the calibration left in float: measured on ``range_images`` (calibration images), else
    the ones a checkpoint stored."""
    onnx = _onnx()
    prof = profile(target)
    try:
        traced = trace(model)
    except UnsupportedModel as e:
        raise ExportError(f"ONNX export: {e}") from None
    from torch.fx.passes.shape_prop import ShapeProp

    functions = {**_FUNCTIONS, **ATEN_FUNCTIONS}
    with torch.no_grad(), quantization(model, False):  # shapes for the ops that need a rank or a head size
        ShapeProp(fx.GraphModule(model, traced)).propagate(torch.zeros(2, *input_shape[1:], device=next(model.parameters()).device))
    ranges = None  # without any, the first float input an integer op takes is refused by name
    if quantized and prof.integer_ops:
        ranges = observed_ranges(model, traced, range_images) if range_images is not None else _stored_ranges(model)
    g = _Graph(quantized, prof, ranges)
    mods = dict(model.named_modules())
    env: dict[fx.Node, object] = {}
    out: Value | None = None
    for node in traced.nodes:
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        hint = node.target if node.op == "call_module" else node.name
        g.current = node
        if node.op == "placeholder":
            env[node] = Value(INPUT_NAME)
        elif node.op == "get_attr":  # a float parameter between layers (LayerNorm, class token, ...)
            t = fetch_attr(model, node.target)
            env[node] = Value(g.const(node.target, t.detach().cpu().float().numpy()))
        elif node.op == "call_module":
            env[node] = _module(g, mods[node.target], list(args), hint)
        elif node.op == "call_function" and node.target in functions:
            env[node] = _call(functions[node.target], g, args, kwargs, hint)
        elif node.op == "call_method" and node.target in _METHODS:
            env[node] = _call(_METHODS[node.target], g, args, kwargs, hint)
        elif node.op == "output":
            out = args[0]
        else:
            what = getattr(node.target, "__name__", str(node.target))
            raise ExportError(f"{node.name}: {node.op} {what!r} has no ONNX export here (exported: conv/linear layers and "
                              f"{', '.join(sorted({getattr(t, '__name__', str(t)).split('.')[0] for t in functions}))})")
        if isinstance(env.get(node), Value):
            g.origin.setdefault(env[node].name, node.name)
    if not isinstance(out, Value):
        raise ExportError("the model must return one tensor (the logits)")
    g.nodes.append(onnx.helper.make_node("Identity", [out.name], [OUTPUT_NAME], name=OUTPUT_NAME))
    TP = onnx.TensorProto
    graph = onnx.helper.make_graph(
        g.nodes, name,
        [onnx.helper.make_tensor_value_info(INPUT_NAME, TP.FLOAT, ["batch", *input_shape[1:]])],
        [onnx.helper.make_tensor_value_info(OUTPUT_NAME, TP.FLOAT, ["batch", None])],
        initializer=g.inits,
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="clcalib")
    proto.ir_version = 10  # opset 21's IR; the newest ONNX Runtime releases read
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # e.g. a Linear on 4-D input: the shapes do not type-check
        raise ExportError(f"the exported graph is not valid ONNX ({str(e).splitlines()[0][:300]}); "
                          "the model uses a form this exporter does not translate") from None
    return proto


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...], *, quantized: bool = True,
                target: str = DEFAULT, range_images: torch.Tensor | None = None) -> int:
    """Write ``model`` as ONNX (QDQ) to ``path`` atomically; returns the file size in bytes."""
    from clcalib.atomic import atomic_path

    proto = build_onnx(model, tuple(input_shape), quantized=quantized, target=target, range_images=range_images)
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return Path(path).stat().st_size
