"""Reload a downloaded checkpoint with the library and measure top-1 on a labeled archive."""

from __future__ import annotations

from pathlib import Path

from svc_fmnist import PREPROCESS


def evaluate(checkpoint: Path, eval_zip: Path) -> dict:
    import torch

    import clcalib
    from clcalib.config import Preprocess
    from clcalib.data import load_labeled
    from clcalib.metrics import predict, top1

    torch.set_num_threads(1)
    model = clcalib.load_quantized(checkpoint)
    data = load_labeled(eval_zip, Preprocess(**PREPROCESS))
    logits = predict(model, data.images)
    correct = int((logits.argmax(1) == data.labels).sum())
    return {"quant_top1": top1(logits, data.labels), "correct": correct, "n": len(data.labels)}
