"""Which units take exactly the previous unit's output as their input.

Capturing a unit's inputs runs the network's prefix up to it, twice (quantized and FP), so a
range-only calibration (minmax, mse) spent O(units^2) block passes on it: 90 of 101 s for
resnet18 at 224 px. Where unit k's input is the very tensor unit k-1 returned, with no quantizer
between them, the engine feeds unit k the outputs it has just computed (the same batches, so the
same values) and runs the prefix only where the chain breaks (a pooling or a head between units, a
resumed run's first unit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from clcalib.quant.activation import ActQuantizer
from clcalib.quant.layer import QuantLayer, QuantUnit
from clcalib.quant.switch import quantization


@dataclass(frozen=True)
class Chain:
    follows: list[bool]  # follows[k]: unit k's input is unit k-1's output (follows[0] is False)
    in_numel: list[int]  # per-sample elements of each unit's input and output
    out_numel: list[int]


@torch.no_grad()
def probe(model: nn.Module, units: list[QuantUnit], sample: Tensor) -> Chain | None:
    """Run the FP model on ``sample`` and record the order of unit calls and of the quantizers
    outside units. None when some unit is not called exactly once with one tensor (the engine
    then captures every unit's inputs from the prefix, as it always may)."""
    inside = {id(m) for u in units for m in u.modules()}
    events: list[tuple] = []
    hooks = []

    def enter(k):
        return lambda _m, args: events.append(("in", k, args))

    def leave(k):
        return lambda _m, _args, out: events.append(("out", k, out))

    for k, u in enumerate(units):
        hooks += [u.register_forward_pre_hook(enter(k)), u.register_forward_hook(leave(k))]
    for m in model.modules():  # a quantizer between two units breaks the chain: it changes the tensor when quantized
        if isinstance(m, (ActQuantizer, QuantLayer)) and id(m) not in inside:
            hooks.append(m.register_forward_pre_hook(lambda _m, _a: events.append(("quant",))))
    try:
        with quantization(model, False):
            model(sample)
    finally:
        for h in hooks:
            h.remove()
    calls = [e for e in events if e[0] == "in"]
    if [e[1] for e in calls] != list(range(len(units))) or any(len(e[2]) != 1 or not isinstance(e[2][0], Tensor) for e in calls):
        return None
    outs = {e[1]: e[2] for e in events if e[0] == "out"}
    if any(not isinstance(outs.get(k), Tensor) for k in range(len(units))):
        return None
    follows = [False] * len(units)
    for i, e in enumerate(events):
        if e[0] == "in" and e[1] > 0 and i > 0:
            prev = events[i - 1]
            follows[e[1]] = prev[0] == "out" and prev[1] == e[1] - 1 and e[2][0] is prev[2]
    return Chain(follows, [e[2][0][0].numel() for e in calls], [outs[k][0].numel() for k in range(len(units))])
