"""Which units can take their inputs from the unit before them instead of the network's prefix.

Capturing a unit's inputs runs the network up to it, twice (quantized and FP), so a range-only
calibration (minmax, mse) spent O(units^2) block passes on it: 90 of 101 s for resnet18 at 224
px. The engine instead feeds unit k from the outputs unit k-1 has just computed, where the probe
on a sample shows that unit k's input is
- ``direct``: the very tensor unit k-1 returned, no quantizer between them; or
- ``gap``: a function of that tensor alone (a pooling, a flatten between units). The network then
  runs with units 0..k-1 standing in (unit k-1 returns the given outputs, earlier ones a one-image
  zero tensor) and stops at unit k, so only the ops in the gap compute.
Both give the same values as the prefix (the same ops on the same batches). Elsewhere (the first
unit, a skip from an earlier unit, a quantizer outside units) the prefix runs, as it always may.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from clcalib.quant.activation import ActQuantizer
from clcalib.quant.layer import QuantLayer, QuantUnit
from clcalib.quant.switch import quantization
from clcalib.recon.capture import capture

Feed = Literal["prefix", "direct", "gap"]


@dataclass(frozen=True)
class Chain:
    feeds: list[Feed]  # how unit k gets its inputs (feeds[0] is "prefix")
    in_numel: list[int]  # per-sample elements of each unit's input
    out_shapes: list[tuple[int, ...]]  # per-sample shape of each unit's output
    input_shape: tuple[int, ...]  # per-sample shape of the network's input

    @property
    def out_numel(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.out_shapes]


@contextmanager
def _standing_in(units: list[QuantUnit], earlier: list[Tensor], prev: Tensor):
    """Units 0..k-1 skip their work (k = len(earlier) + 1): unit k-1 returns ``prev``, each
    earlier unit its tensor of ``earlier``."""
    stand_ins = [*earlier, prev]
    for j, t in enumerate(stand_ins):
        units[j].forward = lambda *_a, _t=t, **_k: _t
    try:
        yield
    finally:
        for j in range(len(stand_ins)):
            units[j].__dict__.pop("forward", None)


@torch.no_grad()
def through_gap(model: nn.Module, chain: Chain, units: list[QuantUnit], k: int, outs: Tensor, batch: int, *,
                quant: bool, device: torch.device, store: torch.device) -> Tensor:
    """Unit k's inputs given unit k-1's outputs ``outs`` (a ``gap`` feed), batch by batch."""
    res = []
    for i in range(0, len(outs), batch):
        ob = outs[i : i + batch].to(device, copy=True)  # an in-place op in the gap must not write into the cache
        start = torch.zeros((1, *chain.input_shape), dtype=ob.dtype, device=ob.device)
        zeros = [torch.zeros((1, *shape), dtype=ob.dtype, device=ob.device) for shape in chain.out_shapes[: k - 1]]
        with _standing_in(units, zeros, ob):
            res.append(capture(model, units[k], start, 1, quant=quant, outputs=False, store=store)[0])
    return torch.cat(res)


@torch.no_grad()
def probe(model: nn.Module, units: list[QuantUnit], sample: Tensor) -> Chain | None:
    """Run the FP model on ``sample`` (two images or more), record the order of unit calls and of
    the quantizers outside units, and try each gap. None when some unit is not called exactly
    once with one tensor."""
    inside = {id(m) for u in units for m in u.modules()}
    events: list[tuple] = []
    hooks = []

    def enter(k):  # with the version counter of its input: an in-place op since the unit before bumps it
        return lambda _m, args: events.append(("in", k, args, getattr(args[0], "_version", None) if args else None))

    def leave(k):  # a copy of the output too: an in-place op after the unit may change the tensor itself
        return lambda _m, args, out: events.append(
            ("out", k, out, out._version if isinstance(out, Tensor) else None, out.clone() if isinstance(out, Tensor) else None,
             getattr(args[0], "_version", None) if args else None))

    for k, u in enumerate(units):
        hooks += [u.register_forward_pre_hook(enter(k)), u.register_forward_hook(leave(k))]
    for m in model.modules():  # a quantizer outside units changes the tensor when quantized
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
    # a unit that writes into its input (x.relu_() first thing): the engine's passes over a cached
    # input then see it changed, and the outputs they give the next unit are not the network's
    if any(e[3] != o[5] for e in calls for o in events if o[0] == "out" and o[1] == e[1]):
        return None
    out_values = {e[1]: e[4] for e in events if e[0] == "out"}  # as the unit returned them
    if any(not isinstance(outs.get(k), Tensor) for k in range(len(units))):
        return None
    ins = [e[2][0] for e in calls]
    chain = Chain(["prefix"] * len(units), [t[0].numel() for t in ins], [tuple(outs[k].shape[1:]) for k in range(len(units))],
                  tuple(sample.shape[1:]))
    quant_seen = False  # a gap's stand-in run passes every quantizer before it: allow none
    for i, e in enumerate(events):
        quant_seen |= e[0] == "quant"
        if e[0] != "in" or e[1] == 0:
            continue
        k, prev = e[1], events[i - 1]
        # the very tensor, and not changed in place since (relu_, clamp_, +=): else a gap at best
        if prev[0] == "out" and prev[1] == k - 1 and ins[k] is prev[2] and e[3] == prev[3]:
            chain.feeds[k] = "direct"
        elif not quant_seen and _gap_holds(model, chain, units, k, out_values[k - 1], ins[k]):
            chain.feeds[k] = "gap"
    return chain


def _gap_holds(model: nn.Module, chain: Chain, units: list[QuantUnit], k: int, prev_out: Tensor, expected: Tensor) -> bool:
    """Unit k's input computed from unit k-1's output alone equals the real one. The stand-ins
    are random here, so a skip from an earlier unit shows as a difference (or an error)."""
    g = torch.Generator(device=prev_out.device).manual_seed(0)
    noisy = [torch.randn((1, *shape), generator=g, device=prev_out.device) for shape in chain.out_shapes[: k - 1]]
    start = torch.randn((1, *chain.input_shape), generator=g, device=prev_out.device)
    try:
        with _standing_in(units, noisy, prev_out.clone()):
            got = capture(model, units[k], start, 1, quant=False, outputs=False)[0]
        return got.shape == expected.shape and torch.equal(got, expected)
    except Exception:  # noqa: BLE001 - a gap that cannot run alone is simply not used
        return False
