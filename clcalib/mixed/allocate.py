"""Bits per site under a budget: a multiple-choice knapsack solved exactly as an integer program
(SciPy's HiGHS): one bit width per site, the stored weight bytes (or the average weight bits)
within the budget, optionally the size-weighted average activation bits too, minimising the sum
of the sites' measured sensitivities."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from clcalib.errors import ConfigError
from clcalib.mixed.sensitivity import SiteCost, act_sites, weight_site


@dataclass
class Allocation:
    layer_bits: dict[str, int]  # every free site's bits (fixed ones keep theirs)
    weight_bytes: int | None  # the quantized layers' stored bytes; None: weights not allocated
    w_bits_avg: float | None  # parameter-weighted
    a_bits_avg: float | None  # element-weighted over the activation sites measured; None: weights only
    predicted_cost: float  # the sum of the chosen sites' sensitivities

    def to_dict(self) -> dict:
        return asdict(self)


def _weights(costs: list[SiteCost]) -> list[SiteCost]:
    return [c for c in costs if c.kind == "weight"]


def size_of(costs: list[SiteCost], bits: dict[str, int]) -> tuple[int | None, float | None, float | None]:
    """(weight bytes, average weight bits, average activation bits) with ``bits`` for the free
    sites and the configured bits elsewhere."""
    w = _weights(costs)
    a = [c for c in costs if c.kind == "act"]
    chosen = {c.name: (c.bits if c.fixed else bits.get(c.name, c.bits)) for c in costs}
    if not w:  # an activation budget alone: the weights keep w_bits and were not measured
        wbytes, wavg = None, None
    else:
        wbytes = sum(c.bytes[chosen[c.name]] for c in w)
        wavg = sum(c.size * chosen[c.name] for c in w) / sum(c.size for c in w)
    aavg = sum(c.size * chosen[c.name] for c in a) / sum(c.size for c in a) if a else None
    return wbytes, wavg, aavg


def smallest(costs: list[SiteCost]) -> tuple[int, float]:
    """(weight bytes, average weight bits) of the smallest model the choices allow: every free
    site at its fewest bits, fixed ones at theirs."""
    low = {c.name: min(c.choices) for c in costs if not c.fixed}
    wbytes, wavg, _ = size_of(costs, low)
    return wbytes, wavg


def allocate(costs: list[SiteCost], *, weight_bytes: int | None = None, w_bits_avg: float | None = None,
             a_bits_avg: float | None = None) -> Allocation:
    """The least total sensitivity within the budget (``check_budget`` has refused a weight budget
    below the smallest model already)."""
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
        cons.append(LinearConstraint(row[None], -np.inf, rest))
    if w_bits_avg is not None:
        total = sum(c.size for c in _weights(costs))
        row = np.array([c.size * b if c.kind == "weight" else 0 for c, b in var], float)
        rest = w_bits_avg * total - sum(c.size * c.bits for c in w_fixed)
        cons.append(LinearConstraint(row[None], -np.inf, rest))
    if a_bits_avg is not None:
        acts = [c for c in costs if c.kind == "act"]
        total = sum(c.size for c in acts)
        row = np.array([c.size * b if c.kind == "act" else 0 for c, b in var], float)
        rest = a_bits_avg * total - sum(c.size * c.bits for c in acts if c.fixed)
        _check_act_floor(costs, a_bits_avg)
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


def _check_act_floor(costs: list[SiteCost], a_bits_avg: float) -> None:
    """An activation budget below every free activation site at its fewest bits (fixed ones at
    theirs): refused in one line naming that smallest average."""
    low = {c.name: min(c.choices) for c in costs if c.kind == "act" and not c.fixed}
    floor = size_of(costs, low)[2]
    if floor is not None and floor > a_bits_avg + 1e-9:
        raise ConfigError(f"budget.a_bits_avg {a_bits_avg:g} is below the smallest average these choices allow "
                          f"({floor:.3f} bits: every free activation at {min(min(c.choices) for c in costs if c.kind == 'act')} "
                          "bits, the first and last at first_last_bits); raise it, or allow fewer bits in "
                          "budget.a_choices")


def check_budget(qm, config, images=None) -> None:
    """Refuse, before anything is measured, a weight budget (or every rung of a target's ladder)
    below the smallest model the choices allow: every free layer at its fewest bits, first/last
    and layer_bits' sites at theirs. With ``images`` (one is enough: it counts each activation's
    elements), an activation budget too. One line naming that smallest size."""
    from clcalib.quant.layer import QuantLayer
    from clcalib.quant.sites import site_modules

    b, t = config.budget, config.target
    if b is not None and b.a_bits_avg is not None and images is not None:
        _check_act_floor(list(act_sites(qm, images[:1], b.a_choices).values()), b.a_bits_avg)
    choices = b.w_choices if b is not None else (t.w_choices if t is not None else None)
    if choices is None:
        return
    fixed = {id(m) for m in getattr(qm, "first_last", [])}
    low_bytes, low_avg = smallest([weight_site(n, m, id(m) in fixed or n in config.layer_bits, choices)
                                   for n, m in site_modules(qm.model).items() if isinstance(m, QuantLayer)])
    how = f"every free layer at {min(choices)} bits, the first conv and the classifier at first_last_bits"
    if b is not None and b.weight_mb is not None and low_bytes > b.weight_mb * 1e6:
        raise ConfigError(f"budget.weight_mb {b.weight_mb:g} is below the smallest model these choices allow "
                          f"({low_bytes / 1e6:.4g} MB: {how}); raise it, or allow fewer bits (budget.w_choices)")
    if b is not None and b.w_bits_avg is not None and low_avg > b.w_bits_avg + 1e-9:
        raise ConfigError(f"budget.w_bits_avg {b.w_bits_avg:g} is below the smallest these choices allow "
                          f"({low_avg:.3f} bits: {how}); raise it, or set first_last_bits null")
    if t is not None and all(r < low_avg for r in t.w_bits_avg):
        raise ConfigError(f"no candidate of target.w_bits_avg {list(t.w_bits_avg)} is possible: the smallest model "
                          f"these choices allow has {low_avg:.3f} average weight bits ({how}); add larger averages")
