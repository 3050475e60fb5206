"""Turn a float model into a quantized one and split it into reconstruction units.

Residual blocks (ResNet BasicBlock/Bottleneck, MobileNetV2 InvertedResidual, RegNet
ResBottleneckBlock, MnasNet inverted residual) become one unit each; every other Conv2d or
Linear (with its BatchNorm and ReLU/ReLU6) becomes a unit of its own. Quantizer placement
follows BRECQ/QDrop: a unit quantizes its output; inside a block, a conv followed by an
activation quantizes its output, a conv feeding the residual sum does not.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from clcalib.config import ActPlacement, CalibConfig, Partition
from clcalib.errors import UnsupportedModel
from clcalib.quant.activation import RangeSearch
from clcalib.quant.layer import QuantLayer, QuantUnit
from clcalib.quant.sites import apply_layer_bits, set_bits
from clcalib.quant.switch import quantization

ACTS = (nn.ReLU, nn.ReLU6)


@dataclass(frozen=True)
class QuantSpec:
    w_bits: int
    a_bits: int
    first_last_bits: int | None
    w_symmetric: bool = False
    every_layer: bool = False  # ActPlacement.EVERY_LAYER: residual-branch outputs quantized too
    act_search: RangeSearch = RangeSearch()  # how activation quantizers take their range
    layer_bits: tuple[tuple[str, int], ...] = ()  # per-site bits (config.layer_bits), set last

    @classmethod
    def from_config(cls, cfg: CalibConfig) -> QuantSpec:
        return cls(cfg.w_bits, cfg.a_bits, cfg.first_last_bits, cfg.w_symmetric,
                   cfg.act_placement is ActPlacement.EVERY_LAYER,
                   RangeSearch(cfg.method.spec.range_search, cfg.act_range_p), tuple(cfg.layer_bits.items()))

    def in_block_out_bits(self, followed_by_activation: bool) -> int | None:
        """Bits of the output quantizer of a layer inside a block: quantized before an
        activation (and everywhere with every_layer), FP where it feeds the residual sum."""
        return self.a_bits if (followed_by_activation or self.every_layer) else None


# --- block registry ------------------------------------------------------------------------
BlockConverter = Callable[[nn.Module, QuantSpec], None]
_BLOCKS: dict[type, BlockConverter] = {}


def register_block(*types: type):
    """Register how a residual block type has its layers quantized (in place)."""

    def deco(fn: BlockConverter) -> BlockConverter:
        for t in types:
            _BLOCKS[t] = fn
        return fn

    return deco


def _ql(conv, bn, act, spec: QuantSpec, out_bits):
    return QuantLayer(conv, bn, copy.deepcopy(act) if act is not None else None, spec.w_bits, out_bits, spec.w_symmetric,
                      spec.act_search)


def _resnet_block(block: nn.Module, spec: QuantSpec) -> None:
    # conv_i + bn_i by name: torchvision's Bottleneck registers its one ReLU after bn3, so the
    # registration order does not say which convs the ReLU follows.
    convs = sorted(n for n, _ in block.named_children() if n.startswith("conv"))
    for i, name in enumerate(convs):
        last = i == len(convs) - 1
        act = None if last else nn.ReLU()  # the block's self.relu after a quantized ReLU output is a no-op
        setattr(block, name, _ql(getattr(block, name), getattr(block, "bn" + name[4:]), act, spec,
                                 spec.in_block_out_bits(followed_by_activation=not last)))
        setattr(block, "bn" + name[4:], nn.Identity())
    if block.downsample is not None:
        _convert_children(block.downsample, spec, in_block=True, units=None)


def _generic_block(block: nn.Module, spec: QuantSpec) -> None:
    # a block without its residual add (MobileNetV2/MnasNet at a stride or width change) ends in
    # the unit's own output quantizer: a second one on its last conv would quantize twice
    if not getattr(block, "use_res_connect", getattr(block, "apply_residual", True)):
        spec = dataclasses.replace(spec, every_layer=False)
    _convert_children(block, spec, in_block=True, units=None)


def _register_torchvision_blocks() -> None:
    from torchvision.models.mnasnet import _InvertedResidual as MnasBlock
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.regnet import ResBottleneckBlock
    from torchvision.models.resnet import BasicBlock, Bottleneck

    register_block(BasicBlock, Bottleneck)(_resnet_block)
    register_block(InvertedResidual, MnasBlock, ResBottleneckBlock)(_generic_block)


_register_torchvision_blocks()


# --- conversion ----------------------------------------------------------------------------
def _convert_children(parent: nn.Module, spec: QuantSpec, in_block: bool, units: list | None) -> None:
    children = list(parent.named_children())
    sequential = isinstance(parent, nn.Sequential)
    i = 0
    while i < len(children):
        name, m = children[i]
        if type(m) in _BLOCKS and not in_block:
            _BLOCKS[type(m)](m, spec)
            unit = QuantUnit(m, spec.a_bits, spec.act_search)
            setattr(parent, name, unit)
            units.append(unit)
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            bn = act = None
            j = i + 1
            if j < len(children) and isinstance(children[j][1], nn.BatchNorm2d) and isinstance(m, nn.Conv2d):
                bn = children[j][1]
                setattr(parent, children[j][0], nn.Identity())
                j += 1
            if j < len(children) and isinstance(children[j][1], ACTS):
                act = children[j][1]
                if sequential:
                    setattr(parent, children[j][0], nn.Identity())
                elif type(act) is not nn.ReLU:
                    raise UnsupportedModel(f"{type(act).__name__} outside a Sequential after {name}")
                j += 1
            # outside blocks every layer quantizes its output; inside, only before an activation
            out_bits = spec.in_block_out_bits(act is not None) if in_block else spec.a_bits
            ql = _ql(m, bn, act, spec, out_bits)
            if in_block:
                setattr(parent, name, ql)
            else:
                unit = QuantUnit(ql, None)
                setattr(parent, name, unit)
                units.append(unit)
            i = j
            continue
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise UnsupportedModel(f"BatchNorm {name} does not follow a conv; cannot fold it")
        else:
            _convert_children(m, spec, in_block, units)
        i += 1


def is_mobile_like(model: nn.Module) -> bool:
    """Has depthwise convolutions (MobileNet, MnasNet, EfficientNet): the nets for which the
    papers' scripts take other defaults. Reads a float model or a converted one alike."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels:
            return True
        if isinstance(m, QuantLayer) and m.is_conv and m.conv_args["groups"] > 1 and m.weight.shape[1] == 1:
            return True
    return False


def _registry_types() -> tuple[type, ...]:
    from torchvision.models import MNASNet, MobileNetV2, RegNet, ResNet

    return (ResNet, MobileNetV2, RegNet, MNASNet)


def uses_graph(model, partition: Partition) -> bool:
    """Whether ``model`` (an nn.Module or a torch.export program) goes through the graph path."""
    if partition is Partition.AUTO:
        return not isinstance(model, _registry_types())
    if partition is Partition.MODULES and not isinstance(model, nn.Module):
        raise UnsupportedModel("partition=modules needs an nn.Module; an exported program is partitioned from its graph")
    return partition is Partition.GRAPH


class QuantModel(nn.Module):
    """The converted model and its reconstruction units in execution order. ``model``: an
    nn.Module, or a torch.export program (graph path only); ``decomposed``: the program a
    checkpoint stored (see ``as_program``)."""

    def __init__(self, model, spec: QuantSpec, example_input: torch.Tensor, partition: Partition = Partition.AUTO,
                 decomposed: bool = False):
        super().__init__()
        self.spec = spec
        if uses_graph(model, partition):
            from clcalib.graph.program import as_program, graph_module
            from clcalib.graph.units import convert_graph

            self.program = as_program(model, example_input, decomposed)  # kept: the checkpoint rebuilds from it
            try:
                self.model = convert_graph(graph_module(self.program), spec)
            except UnsupportedModel:
                raise
            except Exception as e:  # a graph form the partitioner does not know: a refusal, never a crash
                first = (str(e).strip().splitlines() or [""])[0][:300]
                raise UnsupportedModel(
                    f"clcalib cannot split this model's graph into reconstruction units ({type(e).__name__}: {first}). "
                    "This is a limit of clcalib, not a fault in the file, and retrying will not help; "
                    "please report it with the model's architecture") from None
        else:
            self.program = None
            self.model = copy.deepcopy(model).eval().float()
            _convert_children(self.model, spec, in_block=False, units=[])
        found = [m for m in self.model.modules() if isinstance(m, QuantUnit)]
        self.unit_names = self._execution_order(found, example_input)
        self._apply_first_last_bits()
        apply_layer_bits(self.model, dict(spec.layer_bits))  # the one place per-site bits are set

    def _execution_order(self, found: list[QuantUnit], x: torch.Tensor) -> list[str]:
        names = {id(u): n for n, u in self.model.named_modules() if isinstance(u, QuantUnit)}
        order: list[str] = []
        hooks = [u.register_forward_pre_hook(lambda mod, inp: order.append(names[id(mod)])) for u in found]
        try:
            with torch.no_grad(), quantization(self.model, False):  # no ranges yet: run it as FP
                self.model(x[:1].to(next(self.model.buffers()).device))
        except RuntimeError as e:  # wrong channel count or size for this arch
            raise UnsupportedModel(f"the model cannot run on inputs of shape {tuple(x.shape[1:])}: {str(e).splitlines()[0]}") from None
        finally:
            for h in hooks:
                h.remove()
        if sorted(order) != sorted(names.values()):
            raise UnsupportedModel("every unit must run exactly once per forward pass; this model reuses or skips modules")
        return order

    def _apply_first_last_bits(self) -> None:
        units = self.units()
        last = units[-1]
        # one Linear classifier, or a unit of Linear heads only whose logits are combined
        # (DeiT's and LeViT's distillation heads, averaged in eval)
        heads = [last.body] if isinstance(last.body, QuantLayer) else last.layers()
        if len(units) < 2 or not heads or not all(not h.is_conv for h in heads):
            raise UnsupportedModel("the model must end in a Linear classifier (or Linear heads whose outputs are "
                                   "combined)")
        for h in heads:
            h.out_quant = None  # logits stay FP
        last.out_quant = None
        fl = self.spec.first_last_bits
        self.first_last: list[nn.Module] = []  # the sites first_last_bits set (mixed precision leaves them)
        if fl is not None:
            before = units[-2].output_quantizer()
            # none before the classifier where a LayerNorm sits there (transformers)
            self.first_last = [units[0].layers()[0], *heads] + ([before] if before is not None else [])
            for site in self.first_last:
                set_bits(site, fl)

    def units(self) -> list[QuantUnit]:
        mods = dict(self.model.named_modules())
        return [mods[n] for n in self.unit_names]

    def layers(self) -> list[QuantLayer]:
        return [m for m in self.model.modules() if isinstance(m, QuantLayer)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
