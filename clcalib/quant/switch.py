"""State changes that undo themselves: quantization on/off, observing, requires_grad."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from clcalib.quant.activation import ActQuantizer
from clcalib.quant.layer import QuantLayer
from clcalib.quant.primitives import qmax_of, widen_to_8bit


@contextmanager
def quantization(model: nn.Module, enabled: bool, modules: list[nn.Module] | None = None):
    """Run ``model`` with all weight and activation quantization on or off, then restore.
    ``modules``: ``list(model.modules())`` computed once by a caller that switches often (the
    walk over a deep model costs more than a small forward pass)."""
    mods = [m for m in (model.modules() if modules is None else modules) if isinstance(m, (ActQuantizer, QuantLayer))]
    saved = [m.active for m in mods]
    for m in mods:
        m.active = enabled
    try:
        yield model
    finally:
        for m, s in zip(mods, saved, strict=True):
            m.active = s


@contextmanager
def eight_bit_activations(model: nn.Module):
    """Every activation quantizer below 8 bits runs as 8 bits over its calibrated clamp range
    (``widen_to_8bit``): the model an integer export profile writes, for checking the file."""
    mods = [m for m in model.modules() if isinstance(m, ActQuantizer) and m.bits < 8 and m.initialized]
    saved = [(m.bits, m.scale.detach().clone(), m.zero.detach().clone()) for m in mods]
    with torch.no_grad():
        for m in mods:
            scale, zero = widen_to_8bit(float(m.step_size()), int(m.zero.item()), qmax_of(m.bits))
            m.bits = 8
            m.scale.fill_(scale)
            m.zero.fill_(zero)
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, (bits, scale, zero) in zip(mods, saved, strict=True):
                m.bits = bits
                m.scale.copy_(scale)
                m.zero.copy_(zero)


@contextmanager
def observing(quantizers: list[ActQuantizer]):
    """The next forward pass sets each quantizer's range from the tensor it sees."""
    for q in quantizers:
        q.observing = True
    try:
        yield
    finally:
        for q in quantizers:
            q.observing = False


@contextmanager
def dropping(quantizers: list[ActQuantizer], prob: float, generator: torch.Generator):
    """QDrop: each element a quantizer sees stays FP with probability ``prob`` until exit."""
    for q in quantizers:
        q.drop = (prob, generator)
    try:
        yield
    finally:
        for q in quantizers:
            q.drop = None


@contextmanager
def frozen(model: nn.Module, modules: list[nn.Module] | None = None):
    """No gradients to the model's own parameters while the block is active. ``modules``: as
    for ``quantization`` (read at entry, so parameters added since are included)."""
    if modules is None:
        params = list(model.parameters())
    else:  # model.parameters() deduplicates shared parameters; so does this
        params = list({id(p): p for m in modules for p in m._parameters.values() if p is not None}.values())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, s in zip(params, saved, strict=True):
            p.requires_grad_(s)
