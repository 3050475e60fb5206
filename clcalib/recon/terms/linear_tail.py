"""CL-Calib's FP tail replaced by its first-order expansion at each calibration sample.

The contrastive term embeds ``tail(z_q)``, with ``tail`` the frozen FP rest of the network, and
its gradient needs the tail's forward and backward on every iteration: that is CL's whole cost
(docs/cl_calib.md). The FP side of a unit never changes while it is reconstructed, and ``z_q``
stays near the FP output ``z_f`` of the same sample, so

    tail(z_q) ~ tail(z_f) + J_f (z_q - z_f),    J_f = d tail / d z at z_f,

with ``tail(z_f)`` and ``J_f`` computed once per unit for every calibration sample. Per
iteration the term then costs one batched matrix-vector product instead of the tail. It is
exact at ``z_q = z_f`` (so the relational critic is still 0 there, with zero gradient) and
first-order accurate near it; what it misses is the tail's own nonlinearity between the two
points (ReLUs the quantization error switches).

Its memory is ``M x D x P`` floats (M calibration images, D the tail's outputs: the classes
for the logits tail, P one image's unit output): small for few classes (Fashion-MNIST, 10),
too large for 1000 ImageNet classes at 224 px, which is why ``jacobian_bytes`` is checked
against ``MAX_JACOBIAN_BYTES`` (``check_jacobian_bytes``) before the Jacobians are built, by a
service at upload with the largest activation as the unit output, and per unit here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clcalib.errors import ConfigError

__all__ = ["MAX_JACOBIAN_BYTES", "LinearTail", "check_jacobian_bytes", "jacobian_bytes", "per_sample_jacobian"]

# the largest per-unit Jacobian store (float32) a calibration may hold beside its caches
MAX_JACOBIAN_BYTES = 2 << 30


def jacobian_bytes(images: int, outputs: int, unit_output_numel: int) -> int:
    """The float32 bytes of the per-sample Jacobians of one unit's tail."""
    return 4 * images * outputs * unit_output_numel


def check_jacobian_bytes(images: int, outputs: int, unit_output_numel: int, where: str) -> int:
    """The Jacobians' bytes, or ConfigError naming them when above ``MAX_JACOBIAN_BYTES``."""
    size = jacobian_bytes(images, outputs, unit_output_numel)
    if size > MAX_JACOBIAN_BYTES:
        raise ConfigError(
            f"cl_calib.linearize needs {size / 2**30:.1f} GiB of Jacobians {where} ({images} images x {outputs} "
            f"tail outputs x {unit_output_numel} unit outputs), above the {MAX_JACOBIAN_BYTES / 2**30:.0f} GiB "
            "limit: set linearize false or use fewer calibration images"
        )
    return size


def per_sample_jacobian(tail: nn.Module, z: Tensor, chunk: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``tail(z)`` flattened, (M, D), and each sample's Jacobian ``d tail(z_i) / d z_i``,
    (M, D, P) with P the numel of one sample of ``z``, on ``device``.

    One backward pass per output per chunk: the sum over the chunk of output d has sample i's
    row as its gradient with respect to z_i because the tail treats samples independently
    (a network in eval mode; ``tests/test_linear_tail.py`` checks it against torch.func)."""
    ys, jacs = [], []
    for c in z.split(chunk):
        x = c.to(device).detach().requires_grad_(True)
        with torch.enable_grad():
            y = tail(x).flatten(1)
            d = y.shape[1]
            rows = [torch.autograd.grad(y[:, j].sum(), x, retain_graph=j < d - 1)[0].flatten(1) for j in range(d)]
        ys.append(y.detach())
        jacs.append(torch.stack(rows, dim=1))
    return torch.cat(ys), torch.cat(jacs)


class LinearTail:
    """``tail(z_q) ~ tail(z_f) + J_f (z_q - z_f)`` for the batch ``idx`` of the calibration set."""

    def __init__(self, tail: nn.Module, fp_out: Tensor, chunk: int, device: torch.device):
        self.fp_y, self.jac = per_sample_jacobian(tail, fp_out, chunk, device)

    def __call__(self, out_q: Tensor, target: Tensor, idx: Tensor) -> Tensor:
        delta = (out_q - target).flatten(1).unsqueeze(-1)  # (N, P, 1)
        return self.fp_y[idx] + torch.bmm(self.jac[idx], delta).squeeze(-1)
