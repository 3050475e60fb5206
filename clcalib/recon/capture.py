"""Inputs and outputs of one unit over the calibration set, from the (partly) quantized or the
FP model. The forward pass stops at the unit, so only the prefix of the network runs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clcalib.quant.switch import quantization


class _Stop(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, target: nn.Module, data: Tensor, batch: int, *, quant: bool,
            outputs: bool, run: nn.Module | None = None, device: torch.device | None = None,
            store: torch.device | None = None) -> tuple[Tensor, Tensor | None]:
    """Run ``run`` (default ``model``) over ``data`` and collect ``target``'s inputs (and outputs).
    ``model`` decides which quantizers the ``quant`` switch reaches. Batches run on ``device``
    (default: ``data``'s) and what is collected is kept on ``store`` (default: ``device``), so
    ``data`` and the result may live in host memory (clcalib.recon.placement)."""
    run = run if run is not None else model
    device = device if device is not None else data.device
    store = store if store is not None else device
    ins: list[Tensor] = []
    outs: list[Tensor] = []

    def pre(_m, args):
        ins.append(args[0].detach().to(store))
        if not outputs:
            raise _Stop

    def post(_m, _args, out):
        outs.append(out.detach().to(store))
        raise _Stop

    hooks = [target.register_forward_pre_hook(pre)]
    if outputs:
        hooks.append(target.register_forward_hook(post))
    try:
        with quantization(model, quant):
            for i in range(0, len(data), batch):
                try:
                    run(data[i : i + batch].to(device))
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(ins), (torch.cat(outs) if outputs else None)


@torch.no_grad()
def outputs_of(module: nn.Module, data: Tensor, batch: int, *, quant: bool, device: torch.device,
               store: torch.device) -> Tensor:
    """``module``'s outputs over ``data`` in batches of ``batch``: the same batches, so the same
    values, as capture() records when the network feeds ``module`` these inputs."""
    with quantization(module, quant):
        return torch.cat([module(data[i : i + batch].to(device)).detach().to(store)
                          for i in range(0, len(data), batch)])
