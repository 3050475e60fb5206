"""Pure uniform-affine quantization math. Integers live in [0, 2^bits - 1]; the zero point is
an integer in that range (symmetric = zero point fixed at 2^(bits-1))."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def qmax_of(bits: int) -> int:
    return (1 << bits) - 1


def round_ste(x: Tensor) -> Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


def quantize(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Integer codes (as a float tensor holding integers)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, qmax_of(bits))


def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return (q - zero) * scale


def fake_quantize(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """quantize + dequantize, differentiable in x and scale (STE through the rounding)."""
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        q = torch.clamp(round_ste(x / scale) + zero, 0, qmax_of(bits))
        return dequantize(q, scale, zero)
    # no gradient asked (captures, evaluation): the same values (round_ste's forward is exactly
    # round: r - x and (r - x) + x are exact in floating point), in place on one new tensor; the
    # STE form's seven full-size temporaries were most of a quantized forward's time at 224 px.
    # One difference: +-inf clamps to the range's end here, where the STE form gives NaN
    # (inf - inf); calibration data is checked finite, so only an overflowing model sees it
    return (x / scale).round_().add_(zero).clamp_(0, qmax_of(bits)).sub_(zero).mul_(scale)


def widen_to_8bit(scale: float, zero: int, top: int) -> tuple[float, int]:
    """8-bit codes over the range of ``top + 1`` codes of step ``scale`` from ``zero``: the same
    clamp range, a finer grid. How the integer export profiles write a low-bit activation so
    that int8 kernels take it (clcalib/export/profiles.py); float32 like the step it scales."""
    return float(np.float32(scale) * np.float32(top) / np.float32(255.0)), int(round(zero * 255 / top))


def choose_qparams(lo: Tensor, hi: Tensor, bits: int, symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point covering [lo, hi] (which is widened to contain 0)."""
    qmax = qmax_of(bits)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        half = 1 << (bits - 1)
        amax = torch.maximum(-lo, hi)
        # negative side has `half` steps, positive side `half - 1`
        scale = torch.clamp(torch.maximum(amax / half, hi / max(half - 1, 1)), min=1e-8)
        zero = torch.full_like(scale, float(half))
    else:
        scale = torch.clamp((hi - lo) / qmax, min=1e-8)
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero


@torch.no_grad()
def search_qparams(
    x: Tensor, bits: int, *, symmetric: bool = False, per_channel: bool = False,
    p: float = 2.0, mse: bool = True, max_samples: int = 1 << 18,
) -> tuple[Tensor, Tensor]:
    """Clipping range minimising the Lp quantization error (``mse=False``: plain min/max).

    Per channel: one (scale, zero) per index of dim 0, shaped to broadcast against x.
    The candidate ranges are [a*min, a*max]: a coarse grid a = 0.05..1 in steps of 0.05, then a
    fine one (steps of 0.005) around each channel's best, i.e. a 200-point grid's resolution at
    41 evaluations (this search is most of a short job's start-up time). Per tensor, the error
    is measured on a fixed random subset of ``max_samples`` elements (min/max use all)."""
    x = x.detach()
    flat = x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)
    lo, hi = flat.min(1).values, flat.max(1).values
    best_scale, best_zero = choose_qparams(lo, hi, bits, symmetric)
    if mse:
        if not per_channel and flat.shape[1] > max_samples:
            g = torch.Generator().manual_seed(0)
            flat = flat[:, torch.randint(flat.shape[1], (max_samples,), generator=g).to(flat.device)]
        best_err = torch.full_like(lo, float("inf"))
        best_a = torch.ones_like(lo)

        def consider(a: Tensor) -> None:
            nonlocal best_err, best_scale, best_zero, best_a
            s, z = choose_qparams(lo * a, hi * a, bits, symmetric)
            s_, z_ = s[:, None], z[:, None]
            # quantize-dequantize minus x, in place
            diff = (flat / s_).round_().add_(z_).clamp_(0, qmax_of(bits)).sub_(z_).mul_(s_).sub_(flat).abs_()
            # |d|^p as exp(p log |d|): torch's pow with a fractional exponent took 3/4 of the
            # search's time on a CPU; this is 2.4x faster and picked the same range for every
            # channel of the reference resnet18 and mobilenet_v2 at 2, 4 and 8 bits (log 0 = -inf: exp gives 0)
            err = (diff.square_() if p == 2.0 else diff.log_().mul_(p).exp_()).mean(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, s, best_scale)
            best_zero = torch.where(better, z, best_zero)
            best_a = torch.where(better, a, best_a)

        for i in range(20, 0, -1):
            consider(torch.full_like(lo, i / 20))
        coarse = best_a.clone()
        for j in range(-10, 11):
            if j:
                consider(torch.clamp(coarse + j * 0.005, 0.005, 1.0))
    shape = (-1,) + (1,) * (x.dim() - 1) if per_channel else ()
    return best_scale.reshape(shape), best_zero.reshape(shape)
