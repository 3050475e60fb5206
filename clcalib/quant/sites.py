"""The quantization sites of a converted model, by the names users see (``clcalib inspect``,
``config.layer_bits``, the sensitivity report): a layer's name is its weights, ``<name>.out_quant``
/ ``<name>.in_quant`` its activation quantizers. One naming, used to set per-layer bits and to
report them."""

from __future__ import annotations

import math

from torch import nn

from clcalib.quant.activation import ActQuantizer
from clcalib.quant.layer import QuantLayer


def public_name(path: str) -> str:
    """``model.layer1.0.body.conv1`` -> ``layer1.0.conv1``: the wrapper and unit bodies are ours."""
    return ".".join(p for p in path.removeprefix("model.").split(".") if p != "body")


def site_modules(model: nn.Module) -> dict[str, QuantLayer | ActQuantizer]:
    """Every QuantLayer (its weights) and ActQuantizer of ``model`` by public name."""
    found: dict[str, QuantLayer | ActQuantizer] = {}
    for path, m in model.named_modules():
        if isinstance(m, (QuantLayer, ActQuantizer)):
            name = public_name(path)
            if name in found:  # two paths that differ only by a "body": keep both reachable
                name = path
            found[name] = m
    return found


def set_bits(site: QuantLayer | ActQuantizer, bits: int) -> None:
    if isinstance(site, QuantLayer):
        site.wq.bits = bits
    else:
        site.bits = bits


def bits_of(site: QuantLayer | ActQuantizer) -> int:
    return site.wq.bits if isinstance(site, QuantLayer) else site.bits


def apply_layer_bits(model: nn.Module, layer_bits: dict[str, int]) -> None:
    """Set per-site bits before any range is taken; an unknown name is a config error naming
    the sites there are."""
    sites = site_modules(model)
    unknown = sorted(set(layer_bits) - set(sites))
    if unknown:
        from clcalib.errors import ConfigError

        some = ", ".join(list(sites)[:6])
        raise ConfigError(f"layer_bits names {len(unknown)} site(s) this model does not have, e.g. {unknown[0]!r}; "
                          f"its sites are named like {some}, ... (`clcalib inspect` lists them all)")
    for name, bits in layer_bits.items():
        set_bits(sites[name], bits)


def layer_bytes(layer: QuantLayer, bits: int) -> int:
    """Stored bytes of one layer at ``bits``, as the checkpoint writes it: packed codes, per-channel
    float32 scale and uint8 zero point, float32 bias."""
    return math.ceil(layer.weight.numel() * bits / 8) + 5 * layer.wq.scale.numel() + 4 * layer.bias.numel()
