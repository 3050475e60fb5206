"""Bits per site under a budget: a multiple-choice knapsack solved exactly as an integer program
(SciPy's HiGHS): one bit width per site, the stored weight bytes (or the average weight bits)
within the budget, optionally the size-weighted average activation bits too, minimising the sum
of the sites' measured sensitivities."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from clcalib.errors import ConfigError
from clcalib.mixed.sensitivity import SiteCost


@dataclass
class Allocation:
    layer_bits: dict[str, int]  # every free site's bits (fixed ones keep theirs)
    weight_bytes: int  # the quantized layers' stored bytes
    w_bits_avg: float  # parameter-weighted
    a_bits_avg: float | None  # element-weighted over the activation sites measured; None: weights only
    predicted_cost: float  # the sum of the chosen sites' sensitivities

    def to_dict(self) -> dict:
        return asdict(self)


def _weights(costs: list[SiteCost]) -> list[SiteCost]:
    return [c for c in costs if c.kind == "weight"]


def size_of(costs: list[SiteCost], bits: dict[str, int]) -> tuple[int, float, float | None]:
    """(weight bytes, average weight bits, average activation bits) with ``bits`` for the free
    sites and the configured bits elsewhere."""
    w = _weights(costs)
    a = [c for c in costs if c.kind == "act"]
    chosen = {c.name: (c.bits if c.fixed else bits.get(c.name, c.bits)) for c in costs}
    wbytes = sum(c.bytes[chosen[c.name]] for c in w)
    wavg = sum(c.size * chosen[c.name] for c in w) / max(1, sum(c.size for c in w))
    aavg = sum(c.size * chosen[c.name] for c in a) / sum(c.size for c in a) if a else None
    return wbytes, wavg, aavg


def smallest(costs: list[SiteCost]) -> tuple[int, float]:
    """(weight bytes, average weight bits) of the smallest model the choices allow."""
    low = {c.name: min(c.cost) for c in costs if not c.fixed}
    wbytes, wavg, _ = size_of(costs, low)
    return wbytes, wavg


def allocate(costs: list[SiteCost], *, weight_bytes: int | None = None, w_bits_avg: float | None = None,
             a_bits_avg: float | None = None) -> Allocation:
    """The least total sensitivity within the budget. Raises ConfigError naming the smallest
    possible size when the budget is below it."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    weights_free = weight_bytes is not None or w_bits_avg is not None
    free = [c for c in costs if not c.fixed and (weights_free if c.kind == "weight" else a_bits_avg is not None)]
    var = [(c, b) for c in free for b in sorted(c.cost)]
    n = len(var)
    cons = []
    one = np.zeros((len(free), n))  # one width per site
    for j, (c, _b) in enumerate(var):
        one[free.index(c), j] = 1
    cons.append(LinearConstraint(one, 1, 1))
    w_fixed = [c for c in _weights(costs) if c.fixed]
    if weight_bytes is not None:
        row = np.array([c.bytes[b] if c.kind == "weight" else 0 for c, b in var], float)
        rest = weight_bytes - sum(c.bytes[c.bits] for c in w_fixed)
        lo, _ = smallest(costs)
        if lo > weight_bytes:
            raise ConfigError(f"budget.weight_mb {weight_bytes / 1e6:.4g} is below the smallest model these choices "
                              f"allow ({lo / 1e6:.4g} MB with every free layer at its fewest bits); raise it "
                              "or allow fewer bits in budget.w_choices")
        cons.append(LinearConstraint(row[None], -np.inf, rest))
    if w_bits_avg is not None:
        total = sum(c.size for c in _weights(costs))
        row = np.array([c.size * b if c.kind == "weight" else 0 for c, b in var], float)
        rest = w_bits_avg * total - sum(c.size * c.bits for c in w_fixed)
        _, lo = smallest(costs)
        if lo > w_bits_avg + 1e-9:
            raise ConfigError(f"an average of {w_bits_avg:g} weight bits is below the smallest these choices allow "
                              f"({lo:.3f}: every free layer at its fewest bits, first/last at first_last_bits); "
                              "raise it, or set first_last_bits null")
        cons.append(LinearConstraint(row[None], -np.inf, rest))
    if a_bits_avg is not None:
        acts = [c for c in costs if c.kind == "act"]
        total = sum(c.size for c in acts)
        row = np.array([c.size * b if c.kind == "act" else 0 for c, b in var], float)
        rest = a_bits_avg * total - sum(c.size * c.bits for c in acts if c.fixed)
        if sum(c.size * min(c.cost) for c in acts if not c.fixed) > rest + 1e-6:
            raise ConfigError(f"an average of {a_bits_avg:g} activation bits is below the smallest these choices "
                              "allow; raise budget.a_bits_avg or allow fewer bits in budget.a_choices")
        cons.append(LinearConstraint(row[None], -np.inf, rest))
    # the cost is a divergence: a width that costs nothing more than a smaller one is never worse
    cost = np.array([max(c.cost[b], 0.0) for c, b in var])
    res = milp(cost, constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1))
    if res.x is None:
        raise ConfigError(f"no choice of bits meets the budget ({res.message})")
    bits = {c.name: b for (c, b), x in zip(var, res.x, strict=True) if x > 0.5}
    wbytes, wavg, aavg = size_of(costs, bits)
    return Allocation(bits, wbytes, wavg, aavg if a_bits_avg is not None else None,
                      float(sum(c.cost[bits[c.name]] for c in free)))
