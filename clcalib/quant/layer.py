"""A Conv2d/Linear with its BatchNorm folded in, a weight quantizer, an optional fused
activation and an optional output activation quantizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clcalib.quant.activation import ActQuantizer, RangeSearch
from clcalib.quant.weight import WeightQuantizer


def fold_bn(layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | None) -> tuple[Tensor, Tensor]:
    w = layer.weight.detach().float().clone()
    b = layer.bias.detach().float().clone() if layer.bias is not None else w.new_zeros(w.shape[0])  # on the layer's device
    if bn is not None:
        inv = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
        w = w * inv.reshape((-1,) + (1,) * (w.dim() - 1))
        b = (b - bn.running_mean.float()) * inv + bn.bias.detach().float()
    return w, b


class QuantLayer(nn.Module):
    def __init__(
        self,
        layer: nn.Conv2d | nn.Linear,
        bn: nn.BatchNorm2d | None,
        act: nn.Module | None,
        w_bits: int,
        out_bits: int | None,
        w_symmetric: bool = False,
        search: RangeSearch = RangeSearch(),
    ):
        super().__init__()
        w, b = fold_bn(layer, bn)
        self.register_buffer("weight", w)
        self.register_buffer("bias", b)
        self.is_conv = isinstance(layer, nn.Conv2d)
        if self.is_conv:
            self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
            if layer.padding_mode != "zeros":
                from clcalib.errors import UnsupportedModel

                raise UnsupportedModel(f"padding_mode={layer.padding_mode} is not supported")
        self.act = act if act is not None else nn.Identity()
        self.wq = WeightQuantizer(w.shape, w_bits, w_symmetric)
        self.out_quant = ActQuantizer(out_bits, search) if out_bits is not None else None
        # the graph path quantizes an input that no quantizer before it has put on a grid
        # (after a SiLU, GELU or LayerNorm); the registry path never sets it
        self.in_quant: ActQuantizer | None = None
        self.active = True  # False: FP weights (see quant.switch)

    def quant_weight(self) -> Tensor:
        return self.wq(self.weight) if self.active else self.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.in_quant is not None:
            x = self.in_quant(x)
        w = self.quant_weight()
        y = F.conv2d(x, w, self.bias, **self.conv_args) if self.is_conv else F.linear(x, w, self.bias)
        y = self.act(y)
        if self.out_quant is not None:
            y = self.out_quant(y)
        return y

    def extra_repr(self) -> str:
        out = self.out_quant.bits if self.out_quant is not None else None
        inp = f" in_bits={self.in_quant.bits}" if self.in_quant is not None else ""
        return f"{'conv' if self.is_conv else 'linear'} {tuple(self.weight.shape)} w_bits={self.wq.bits}{inp} out_bits={out}"


class QuantUnit(nn.Module):
    """A reconstruction unit: a residual block (its convs already QuantLayers) or a single
    QuantLayer, plus the quantizer of the unit's output (none for a QuantLayer, which owns it)."""

    def __init__(self, body: nn.Module, out_bits: int | None, search: RangeSearch = RangeSearch()):
        super().__init__()
        self.body = body
        self.out_quant = ActQuantizer(out_bits, search) if out_bits is not None else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        return self.out_quant(y) if self.out_quant is not None else y

    def layers(self) -> list[QuantLayer]:
        return [m for m in self.modules() if isinstance(m, QuantLayer)]

    def act_quantizers(self) -> list[ActQuantizer]:
        return [m for m in self.modules() if isinstance(m, ActQuantizer)]

    def output_quantizer(self) -> ActQuantizer | None:
        """The quantizer of what this unit hands to the next one."""
        if self.out_quant is not None:
            return self.out_quant
        return self.body.out_quant if isinstance(self.body, QuantLayer) else None
