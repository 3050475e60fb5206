"""Per-site sensitivity: for each quantization site (a layer's weights, an activation quantizer)
and each candidate bit width, how far the model's predictions move when that site alone is
quantized, everything else FP.

The measure is the mean KL divergence of the quantized model's softmax from the FP model's on
calibration images (no labels needed), with ranges taken as the method takes them and nearest
rounding. It is a proxy: reconstruction recovers part of each site's error afterwards, and the
allocation adds the sites' costs as if they were independent. docs/mixed_precision.md measures how
well it ranks the sites against their real top-1 drop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from clcalib.metrics import predict, top1
from clcalib.quant.activation import ActQuantizer
from clcalib.quant.layer import QuantLayer
from clcalib.quant.sites import bits_of, layer_bytes, set_bits, site_modules
from clcalib.quant.switch import observing, quantization

CHUNK = 128  # images per forward pass: bounds the memory of a sensitivity pass at any resolution


@dataclass
class SiteCost:
    name: str
    kind: str  # "weight" | "act"
    size: int  # weights: parameters; activations: elements per image
    bits: int  # the bits the config gives it (first/last fixed, or w_bits / a_bits)
    fixed: bool  # set by first_last_bits or config.layer_bits: left out of the allocation
    choices: tuple[int, ...] = ()  # the widths the allocation may give it
    cost: dict[int, float] = field(default_factory=dict)  # bits -> mean KL(FP || this site alone quantized)
    top1_drop: dict[int, float] = field(default_factory=dict)  # bits -> points lost (with an evaluation set)
    bytes: dict[int, int] = field(default_factory=dict)  # weights: bits -> stored bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("cost", "top1_drop", "bytes"):
            d[k] = {str(b): v for b, v in d[k].items()}
        return d


def _log_probs(model, images: Tensor) -> Tensor:
    return F.log_softmax(predict(model, images, batch=CHUNK, device=images.device), dim=1)


def _kl(ref: Tensor, got: Tensor) -> float:
    return float(F.kl_div(got, ref, log_target=True, reduction="batchmean"))


def _top1(model, images: Tensor, labels: Tensor) -> float:
    return top1(predict(model, images, batch=CHUNK, device=images.device), labels.cpu())


def weight_site(name: str, layer: QuantLayer, fixed: bool, choices: tuple[int, ...]) -> SiteCost:
    """A layer's weights as a site, before anything is measured: parameters, and stored bytes at
    its configured bits and at each choice."""
    given = bits_of(layer)
    return SiteCost(name, "weight", layer.weight.numel(), given, fixed, tuple(choices),
                    bytes={b: layer_bytes(layer, b) for b in {given, *choices}})


def _act_elements(qm, images: Tensor, quantizers: dict[str, ActQuantizer]) -> dict[str, int]:
    seen: dict[str, int] = {}

    def hook(name):
        def record(mod, inp, out) -> None:  # returns None: the output passes unchanged
            seen.setdefault(name, inp[0][0].numel())
        return record

    hooks = [q.register_forward_hook(hook(n)) for n, q in quantizers.items()]
    try:
        qm(images[:1])
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def act_sites(qm, images: Tensor, choices: tuple[int, ...]) -> dict[str, SiteCost]:
    """The activation quantizers that see data (one image passed FP through ``qm``), as sites
    before anything is measured: elements per image, configured bits, ``choices``."""
    fixed = {id(m) for m in getattr(qm, "first_last", [])}
    acts = {n: m for n, m in site_modules(qm.model).items() if isinstance(m, ActQuantizer)}
    with quantization(qm, False):
        elements = _act_elements(qm, images, acts)
    return {n: SiteCost(n, "act", k, bits_of(acts[n]), id(acts[n]) in fixed, tuple(choices)) for n, k in elements.items()}


@torch.no_grad()
def measure(qm, images: Tensor, w_choices: tuple[int, ...] | None, a_choices: tuple[int, ...] | None, mse: bool,
            evaluation: tuple[Tensor, Tensor] | None = None,
            on_site: Callable[[int, int, str], None] | None = None) -> list[SiteCost]:
    """``qm``: a freshly converted QuantModel (no ranges yet; it is left with its sites' bits as
    given but with ranges set: use a copy). ``w_choices`` / ``a_choices`` None: those sites are not
    measured (they keep the config's bits). ``evaluation``
    (images, labels): also each site's real top-1 drop there, to check the proxy."""
    sites = site_modules(qm.model)
    fixed = {id(m) for m in getattr(qm, "first_last", [])}
    acts = act_sites(qm, images, a_choices or ())
    with quantization(qm, False):
        ref = _log_probs(qm, images)
        fp_top1 = _top1(qm, *evaluation) if evaluation is not None else None
    todo = [(n, m) for n, m in sites.items()
            if (w_choices is not None and isinstance(m, QuantLayer)) or (a_choices is not None and n in acts)]
    out: list[SiteCost] = []
    for i, (name, m) in enumerate(todo):
        weight = isinstance(m, QuantLayer)
        sc = weight_site(name, m, id(m) in fixed, w_choices) if weight else acts[name]
        given = bits_of(m)
        for b in sc.choices:
            set_bits(m, b)
            with quantization(qm, False):
                m.active = True
                if weight:
                    m.wq.init_range(m.weight, mse=mse)
                    sc.cost[b] = _kl(ref, _log_probs(qm, images))
                else:
                    with observing([m]):
                        qm(images[:CHUNK])  # the range from one chunk: the memory of one forward pass of CHUNK images
                    sc.cost[b] = _kl(ref, _log_probs(qm, images))
                if fp_top1 is not None:
                    sc.top1_drop[b] = fp_top1 - _top1(qm, *evaluation)
        set_bits(m, given)
        out.append(sc)
        if on_site is not None:
            on_site(i + 1, len(todo), name)
    return out


def proxy_check(costs: list[SiteCost], margin: float = 1.0) -> dict | None:
    """How well the proxy orders the (site, bits) pairs by their real top-1 drop on the evaluation
    set: Spearman's rank correlation over all of them (small drops are mostly the evaluation
    set's noise), and the share of pairs whose drops differ by at least ``margin`` points that the
    proxy puts in the same order. None without an evaluation set."""
    pairs = [(c.cost[b], c.top1_drop[b]) for c in costs for b in c.top1_drop]
    if len(pairs) < 3:
        return None
    from scipy.stats import spearmanr

    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    ordered = [(a[0] > b[0]) for a in pairs for b in pairs if a[1] - b[1] >= margin]
    return {"spearman": None if rho != rho else round(float(rho), 4), "margin_points": margin,
            "pairs": len(ordered), "pairs_in_order": round(sum(ordered) / len(ordered), 4) if ordered else None}
