"""Per-tensor activation quantizer: step size initialised by MSE search, learned with LSQ
(straight-through rounding, gradient to the step size); zero point fixed after init."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from clcalib.quant.primitives import fake_quantize, search_qparams


@dataclass(frozen=True)
class RangeSearch:
    """How an activation quantizer picks its range from data: the Lp-optimal clipping range
    (``lp``, p = config.act_range_p) or plain min/max."""

    lp: bool = True
    p: float = 2.4


class ActQuantizer(nn.Module):
    def __init__(self, bits: int, search: RangeSearch = RangeSearch()):
        super().__init__()
        self.bits = bits
        self.search = search
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("zero", torch.tensor(0.0))
        self.initialized = False  # set from data by observe()
        self.active = True  # switched off to run the FP model (see quant.switch)
        self.observing = False
        self.drop: tuple[float, torch.Generator] | None = None  # QDrop during reconstruction (quant.switch)

    def observe(self, x: Tensor) -> None:
        self.load_range(*search_qparams(x, self.bits, per_channel=False, mse=self.search.lp, p=self.search.p))

    def load_range(self, scale: Tensor, zero: Tensor) -> None:
        """Set the step and zero point (from data, or from a checkpoint) and mark the range set."""
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero.copy_(zero)
        self.initialized = True

    def step_size(self) -> Tensor:
        """The step the quantizer uses: |s| floored (LSQ may push s through zero; a zero step
        would give NaN). The ONNX export and the INT32 bias grid use this same value."""
        return self.scale.abs().clamp_min(1e-8)

    @property
    def nonnegative(self) -> bool:
        """Zero point 0: every dequantized value is >= 0, so a ReLU on them is a no-op."""
        return int(self.zero.item()) == 0

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.observe(x)
        if not self.active:
            return x
        if not self.initialized:  # never pass data through silently as if it had been quantized
            raise RuntimeError(f"a {self.bits}-bit activation quantizer was used before its range was set: calibrate "
                               "first, or run the model inside quant.switch.quantization(model, False)")
        q = fake_quantize(x, self.step_size(), self.zero, self.bits)
        if self.drop is None:
            return q
        p, gen = self.drop
        keep_fp = torch.rand(x.shape, generator=gen, device=x.device) < p
        return torch.where(keep_fp, x, q)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"
