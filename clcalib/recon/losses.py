"""Reconstruction losses. They return tensors; callers decide what to log."""

from __future__ import annotations

from torch import Tensor


def rec_loss(out: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over channels, averaged over batch and positions (BRECQ/QDrop's
    lp_loss with p=2), so the AdaRound regulariser weights keep their published meaning."""
    return (out - target).pow(2).sum(1).mean()


def beta_at(it: int, iters: int, warmup: float, start: float, end: float) -> float | None:
    """AdaRound's annealed beta at iteration ``it``; None during the warm-up (no regulariser)."""
    w = int(warmup * iters)
    if it < w:
        return None
    rel = (it - w) / max(iters - w, 1)
    return end + (start - end) * max(0.0, 1.0 - rel)
