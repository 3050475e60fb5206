"""PD-Quant's losses (Liu et al., "PD-Quant: Post-Training Quantization based on Prediction
Difference Metric", CVPR 2023). Pure functions on tensors.

* ``pd_loss``: the prediction difference, KL(softmax(logits_f / T) || softmax(logits_q / T)),
  averaged over the batch (``batchmean``), where the logits are the frozen FP remainder of the
  network applied to the unit's quantized output (``logits_q``) and to its FP output
  (``logits_f``). No ``T**2`` factor: the reference implementation uses
  ``KLDivLoss(reduction="batchmean")(log_softmax(q / T), softmax(f / T))`` as is.
* ``pd_regularizer``: the term that keeps the unit's quantized output close to its FP output
  (PD-Quant's guard against over-fitting the prediction on ~1k images). It uses the same L_p
  reduction as the BRECQ/QDrop reconstruction loss: ``|out_q - out_f|^p`` summed over dim 1
  (channels/features), averaged over the batch and every remaining dim.

In the reference code the objective is ``reg + round + pd / lamb_r`` (lamb_r = 0.1, T = 4 for
ResNets/RegNets, T = 1 for MobileNetV2/MnasNet), i.e. pd weighted 10x the regulariser; the
regulariser there is evaluated on the QDrop-mixed-input output, the PD term on the output of the
fully quantized input.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["pd_loss", "pd_regularizer"]


def pd_loss(logits_q: Tensor, logits_f: Tensor, temperature: float) -> Tensor:
    """KL(softmax(logits_f/T) || softmax(logits_q/T)) summed over classes (dim 1), averaged over
    the batch (dim 0); scalar, >= 0, zero iff the two predictions agree. Gradients flow to
    ``logits_q`` (``logits_f`` is the target; detach it if it carries a graph)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits_q.shape != logits_f.shape or logits_q.dim() < 2:
        raise ValueError(
            f"logits_q and logits_f must have the same shape (N, C, ...), got "
            f"{tuple(logits_q.shape)} and {tuple(logits_f.shape)}"
        )
    log_p_q = F.log_softmax(logits_q / temperature, dim=1)
    log_p_f = F.log_softmax(logits_f / temperature, dim=1)
    return F.kl_div(log_p_q, log_p_f, reduction="batchmean", log_target=True)


def pd_regularizer(out_q: Tensor, out_f: Tensor, p: float = 2.0) -> Tensor:
    """``|out_q - out_f|^p`` summed over dim 1, averaged over the rest (the BRECQ/QDrop/PD-Quant
    ``lp_loss`` convention); for p = 2 a squared error per sample-position. Scalar, >= 0."""
    if out_q.shape != out_f.shape or out_q.dim() < 2:
        raise ValueError(
            f"out_q and out_f must have the same shape (N, C, ...), got {tuple(out_q.shape)} and "
            f"{tuple(out_f.shape)}"
        )
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")
    return (out_q - out_f).abs().pow(p).sum(dim=1).mean()

