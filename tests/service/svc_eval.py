"""Reload a downloaded checkpoint with the library and measure top-1 on a labeled archive."""

from __future__ import annotations

from pathlib import Path

from svc_fmnist import PREPROCESS


def evaluate(checkpoint: Path, eval_zip: Path) -> dict:
    import torch

    import clcalib
    from clcalib.config import Preprocess
    from clcalib.data import batches, load_labeled

    torch.set_num_threads(1)
    model = clcalib.load_quantized(checkpoint)
    data = load_labeled(eval_zip, Preprocess(**PREPROCESS))
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(1) for b in batches(data.images, 250)])
    correct = int((pred == data.labels).sum())
    return {"quant_top1": correct / len(data.labels), "correct": correct, "n": len(data.labels)}
