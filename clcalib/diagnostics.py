"""Measurements for the report beyond top-1: per-layer SQNR of the weights and of each layer's
output (quantized model against FP, same images), and per-class accuracy with the confusion
matrix. Plain numbers (lists, dicts) that go into report.json; clcalib.report_html draws them."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from clcalib.metrics import sqnr_db
from clcalib.quant.layer import QuantLayer, QuantUnit
from clcalib.quant.switch import quantization

MAX_CONFUSION_CLASSES = 100  # a larger matrix is not kept (nor readable)


def _db(v: float) -> float | None:
    return None if math.isinf(v) or math.isnan(v) else round(v, 3)


def _shown(name: str, units: list[str]) -> str:
    """A layer's name as ``clcalib inspect`` shows it: without the ``body`` of the unit holding it
    (``blocks.3.body.conv_dw`` -> ``blocks.3.conv_dw``; a lone layer's unit is the layer)."""
    for u in units:
        if name == f"{u}.body":
            return u
        if name.startswith(f"{u}.body."):
            return f"{u}.{name[len(u) + 6:]}"
    return name


@torch.no_grad()
def layer_sqnr(model: nn.Module, images: Tensor) -> list[dict]:
    """Per quantized layer, in forward order: weight SQNR (quantized vs FP weights) and output
    SQNR (the layer's output in the quantized model vs the FP model, on ``images``: the error
    accumulated up to that layer)."""
    layers = [(n.removeprefix("model."), m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    outs: dict[bool, dict[str, Tensor]] = {True: {}, False: {}}
    mode = {"quant": True}

    def hook(name):
        def save(_m, _args, out):
            outs[mode["quant"]][name] = out.detach().float().cpu()
        return save

    hooks = [m.register_forward_hook(hook(n)) for n, m in layers]
    try:
        for q in (False, True):
            mode["quant"] = q
            with quantization(model, q):
                model(images)
    finally:
        for h in hooks:
            h.remove()
    order = [n for n in outs[True] if n in outs[False]]  # forward order (dict insertion)
    units = [n.removeprefix("model.") for n, m in model.named_modules() if isinstance(m, QuantUnit)]
    mods = dict(layers)
    return [{"name": _shown(n, units), "weight_sqnr_db": _db(sqnr_db(mods[n].weight, mods[n].wq(mods[n].weight))),
             "output_sqnr_db": _db(sqnr_db(outs[False][n], outs[True][n]))} for n in order]


def per_class(fp_logits: Tensor, q_logits: Tensor, labels: Tensor, num_classes: int) -> dict:
    """Top-1 per class (FP and quantized, % of that class's images; null for a class with no
    images) and the quantized model's confusion matrix (rows: true class, columns: predicted)."""
    out: dict = {"fp_top1": [], "quant_top1": [], "images": []}
    fp_pred, q_pred = fp_logits.argmax(1), q_logits.argmax(1)
    for c in range(num_classes):
        mask = labels == c
        n = int(mask.sum())
        out["images"].append(n)
        out["fp_top1"].append(round(100.0 * float((fp_pred[mask] == c).float().mean()), 2) if n else None)
        out["quant_top1"].append(round(100.0 * float((q_pred[mask] == c).float().mean()), 2) if n else None)
    if num_classes <= MAX_CONFUSION_CLASSES:
        idx = labels.long() * num_classes + q_pred.long()
        out["confusion"] = torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes).tolist()
    return out
