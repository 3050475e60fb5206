"""Accuracy and fidelity metrics of a quantized model against its FP original."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn


@torch.no_grad()
def predict(model: nn.Module, images: Tensor | Iterable[Tensor], batch: int = 500,
            device: str | torch.device = "cpu") -> Tensor:
    """Logits (on CPU, float32) for ``images``: one tensor, or an iterable of batches (e.g.
    ``LabeledSet.images()``, so a large set is never in memory at once)."""
    try:
        model.eval()
    except NotImplementedError:  # a torch.export program's module: its mode was fixed at export
        pass
    batches = images.split(batch) if isinstance(images, Tensor) else images
    return torch.cat([model(x.to(device)).float().cpu() for x in batches])


def top1(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


def agreement(logits_a: Tensor, logits_b: Tensor) -> float:
    return 100.0 * float((logits_a.argmax(1) == logits_b.argmax(1)).float().mean())


def sqnr_db(reference: Tensor, test: Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference``, in dB."""
    noise = float((reference.double() - test.double()).pow(2).sum())
    signal = float(reference.double().pow(2).sum())
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


def compare(fp_logits: Tensor, q_logits: Tensor, labels: Tensor | None) -> dict:
    return {
        "fp_top1": top1(fp_logits, labels) if labels is not None else None,
        "quant_top1": top1(q_logits, labels) if labels is not None else None,
        "top1_agreement": agreement(fp_logits, q_logits),
        "sqnr_db": sqnr_db(fp_logits, q_logits),
    }
