"""Per-output-channel weight quantizer with AdaRound.

States: ``fp`` (no quantization), ``soft`` (AdaRound: learned rounding, differentiable),
``int`` (integer codes ``q``; what is exported and what a reloaded checkpoint runs).
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor, nn

from clcalib.quant.primitives import dequantize, qmax_of, quantize, search_qparams

# rectified sigmoid stretch (AdaRound paper)
ZETA, GAMMA = 1.1, -0.1


class _SoftRound(torch.autograd.Function):
    """AdaRound's soft-quantized weight and its regulariser in one pass over the weights.

    The eager composition of sigmoid/clamp/pow makes ~40 passes over every weight per
    iteration (the hot loop on CPU); this makes about half, with hand-written gradients
    (tested against the eager formula)."""

    @staticmethod
    def forward(ctx, alpha, base, scale, zero, scale_in_range, qmax: float, beta: float | Tensor, reg_coef: float):
        s = torch.sigmoid(alpha)
        h = s.mul(ZETA - GAMMA).add_(GAMMA).clamp_(0, 1)
        w = torch.add(base, h).clamp_(0, qmax).sub_(zero).mul_(scale)
        dh = s.mul_(1 - s).mul_(ZETA - GAMMA).mul_((h > 0) & (h < 1))  # dh/dalpha, 0 where clamped
        g_w = dh.mul(scale_in_range)  # dw/dalpha
        reg = alpha.new_zeros(())
        g_r = None
        if reg_coef > 0:
            t = h.mul_(2).sub_(1)  # 2h - 1 (h is not needed any more)
            a = t.abs()
            u = a.pow(beta - 1)
            reg = (t.numel() - torch.dot(u.view(-1), a.view(-1))) * reg_coef  # sum(1 - |2h-1|^beta)
            # d reg/d alpha = -coef * beta * |2h-1|^(beta-1) * sign(2h-1) * 2 * dh/dalpha
            g_r = torch.copysign(u, t).mul_(dh).mul_(-2 * beta * reg_coef)
        ctx.save_for_backward(g_w, g_r)
        ctx.has_reg = g_r is not None
        return w, reg

    @staticmethod
    def backward(ctx, grad_w, grad_reg):
        g_w, g_r = ctx.saved_tensors
        grad = grad_w * g_w
        if ctx.has_reg:
            grad.add_(g_r * grad_reg)
        return grad, None, None, None, None, None, None, None


class WState(str, Enum):
    FP = "fp"
    SOFT = "soft"
    INT = "int"


class WeightQuantizer(nn.Module):
    def __init__(self, shape: torch.Size, bits: int, symmetric: bool = False):
        super().__init__()
        self.bits = bits
        self.symmetric = symmetric
        bshape = (shape[0],) + (1,) * (len(shape) - 1)
        self.register_buffer("scale", torch.ones(bshape))
        self.register_buffer("zero", torch.zeros(bshape))
        self.register_buffer("q", torch.zeros(shape))  # integer codes, float storage
        self.state = WState.FP
        self.alpha: nn.Parameter | None = None  # AdaRound variables while state == SOFT

    def init_range(self, w: Tensor, mse: bool = True) -> None:
        """Set scale/zero by MSE search (or min/max) and the nearest-rounding codes."""
        # p=2.4 as BRECQ: a slightly heavier tail penalty than MSE suits low-bit weights
        self.scale, self.zero = search_qparams(w, self.bits, symmetric=self.symmetric, per_channel=True, mse=mse, p=2.4)
        self.q = quantize(w, self.scale, self.zero, self.bits)
        self.state = WState.INT

    def load_codes(self, q: Tensor, scale: Tensor, zero: Tensor) -> None:
        """Integer codes with their per-channel scale and zero point (a checkpoint's): state INT."""
        self.scale, self.zero, self.q = scale, zero, q
        self.state = WState.INT

    # --- AdaRound -------------------------------------------------------------------------
    def start_adaround(self, w: Tensor) -> None:
        self._floor = torch.floor(w / self.scale)
        rest = (w / self.scale) - self._floor  # in [0, 1)
        # alpha such that h(alpha) == rest: the soft weight starts at the FP weight
        alpha = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        self.alpha = nn.Parameter(alpha)
        self._base = self._floor + self.zero
        # codes already clipped to the grid's ends get no gradient through the soft weight
        in_range = (self._base >= 0) & (self._base <= qmax_of(self.bits) - 1)
        self._scale_in_range = in_range.to(w.dtype) * self.scale
        self.state = WState.SOFT
        self.set_regularizer(None, 0.0)

    def set_regularizer(self, beta: float | Tensor | None, coef: float) -> None:
        """The next forward also computes AdaRound's regulariser ``coef * sum(1 - |2h - 1|^beta)``
        (read it from ``last_reg``); ``beta=None``: no regulariser (warm-up). ``beta`` may be a
        0-dim device tensor (the reconstruction step's schedule), never read on the host."""
        self._beta, self._reg_coef = (1.0 if beta is None else beta), (coef if beta is not None else 0.0)

    def harden(self) -> None:
        """Fix the learned rounding into integer codes and drop the AdaRound variables."""
        with torch.no_grad():
            up = (self.alpha >= 0).to(self._floor.dtype)
            self.q = torch.clamp(self._floor + up + self.zero, 0, qmax_of(self.bits))
        self.alpha = None
        del self._floor, self._base, self._scale_in_range
        self.state = WState.INT

    # --------------------------------------------------------------------------------------
    def forward(self, w: Tensor) -> Tensor:
        if self.state is WState.INT:
            return dequantize(self.q, self.scale, self.zero)
        if self.state is WState.SOFT:
            w_soft, self.last_reg = _SoftRound.apply(
                self.alpha, self._base, self.scale, self.zero, self._scale_in_range,
                float(qmax_of(self.bits)), self._beta, self._reg_coef)
            return w_soft
        return w
