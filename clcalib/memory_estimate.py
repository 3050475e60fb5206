"""A calibration's peak host memory, estimated before it runs, from one forward pass on two
images: what a service checks against its worker's memory cap at upload, so a job that cannot
fit is refused with the figure instead of failing after its upload and queue time.

The parts (bytes):
- ``base``: torch, the library and the model's weights in their copies (FP, folded, quantized,
  AdaRound's rounding variables and Adam's moments: ``8 x`` the FP weights) plus a fixed
  ``BASE_BYTES`` for the interpreter and torch's libraries;
- ``calibration set``: the decoded, preprocessed set as float32;
- ``unit caches``: each unit's cached FP inputs, quantized inputs and FP outputs for the whole set,
  bounded by ``CACHE_COPIES x`` the largest activation of one image;
- ``batch``: one reconstruction step's forward and backward on a batch: ``STEP_COPIES x`` the sum
  of one image's activations, times the batch size.
It is meant as an upper bound: ``tests/test_memory_estimate.py`` checks it against the measured
peak of real runs.
"""

from __future__ import annotations

import torch
from torch import fx, nn

BASE_BYTES = 1 << 30
CACHE_COPIES = 4
STEP_COPIES = 3
WEIGHT_COPIES = 8


def activation_bytes(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(output, largest activation of one image, sum of one image's activations), in bytes,
    from one forward pass on ``x``."""
    sizes: list[int] = []
    if isinstance(net, fx.GraphModule):  # a program: every call checked (op_allowlist.CALL_CHECKS)
        from clcalib.graph.op_allowlist import checked_interpreter

        class Recorder(checked_interpreter()):
            def run_node(self, n):
                out = super().run_node(n)
                if n.op == "call_function" and isinstance(out, torch.Tensor):
                    sizes.append(out.nbytes)
                return out
        y = Recorder(net).run(x)
    else:
        def hook(_m, _i, out):
            if isinstance(out, torch.Tensor):
                sizes.append(out.nbytes)
        leaves = [m for m in net.modules() if not any(True for _ in m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            y = net(x)
        finally:
            for h in handles:
                h.remove()
    n = max(1, len(x))
    return y, (max(sizes) if sizes else 0) // n, sum(sizes) // n


def estimate_peak(*, weight_bytes: int, image_bytes: int, images: int, batch_size: int,
                  largest_activation: int, activations: int) -> dict[str, int]:
    """The parts of the estimate (see the module docstring) and their ``total``."""
    parts = {
        "base": BASE_BYTES + WEIGHT_COPIES * weight_bytes,
        "calibration set": images * image_bytes,
        "unit caches": CACHE_COPIES * images * largest_activation,
        "batch": STEP_COPIES * min(batch_size, images) * activations,
    }
    return {**parts, "total": sum(parts.values())}
