"""One reconstruction iteration as a function of device state only, so that the same code runs
eagerly (CPU, and the reference on a GPU) or is captured once into a CUDA graph and replayed
(clcalib.recon.graphed).

Everything that changes from one iteration to the next lives in tensors the step owns: the
batch indices come from the unit's generator on the device, AdaRound's beta and the activation
step sizes' learning rate are read from a per-iteration table by a device counter, and the
losses are summed on the device for the progress report. The host only decides the phase from
the iteration number: warm-up without the rounding regulariser or with it, and whether terms that
come on some iterations only (``Terms.every``) come on this one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from clcalib.config import CalibConfig
from clcalib.quant.activation import ActQuantizer
from clcalib.quant.layer import QuantLayer
from clcalib.recon.losses import beta_at, rec_loss


class Terms(Protocol):
    """A unit's terms beside its MSE (clcalib.recon.terms): what the step adds to its loss.

    A CUDA graph may capture them only if they say ``capturable = True`` (read with getattr,
    False when absent: a wrapper that reads values on the host must run eagerly): after their
    first call they do the same device work every call, with no host sync and no state kept
    outside device tensors.

    ``every`` (getattr, 1 when absent): some terms come on iterations 0, every, 2 * every, ...
    only; then the step passes ``turn`` (whether this iteration is one; with ``every`` 1 the call
    has three arguments) and on a GPU each kind of iteration gets its own graph. A term named in
    ``held`` (getattr, empty when absent) is such a term: the step does not add it to the loss but
    keeps its gradient with respect to the learned variables from that turn and adds it to theirs
    on every iteration until its next turn (``cl_calib.hold``). A wrapper of such terms must say
    the inner terms' ``every`` and ``held`` as its own."""

    rec_weight: float  # the weight of the reconstruction MSE beside them

    def __call__(self, out_q: Tensor, target: Tensor, idx: Tensor, turn: bool = True) -> dict[str, Tensor]: ...


class Schedule:
    """AdaRound's beta (annealed after the warm-up) and the activation step sizes' learning rate
    (cosine to 0) for every iteration, as one table on the device, read by a counter that the
    step advances on the device."""

    BETA, LR_ACT = 0, 1

    def __init__(self, cfg: CalibConfig, iters: int, device: torch.device):
        self.warm = int(cfg.warmup * iters)  # iterations before the regulariser starts (beta_at's rule)
        rows = []
        for it in range(iters):
            beta = beta_at(it, iters, cfg.warmup, *cfg.beta)
            # CosineAnnealingLR's closed form (T_max = iters, eta_min = 0), lr after `it` steps
            lr = cfg.lr_act * (1 + math.cos(math.pi * it / iters)) / 2
            rows.append((beta if beta is not None else math.nan, lr))
        # float64: beta enters the regulariser as the Python float did before (a float32 beta
        # changed its gradient in the last bit); the lr is cast to Adam's float32 tensor on copy
        self.table = torch.tensor(rows, dtype=torch.float64, device=device).reshape(iters, 2)
        self.counter = torch.zeros(1, dtype=torch.long, device=device)

    def regularized(self, it: int) -> bool:
        return it >= self.warm

    def next_row(self) -> Tensor:
        row = self.table.index_select(0, self.counter)[0]  # not table[counter]: that reads the index on the host
        self.counter.add_(1)
        return row


def _adam(params: list[Tensor], lr: float | Tensor, device: torch.device, capturable: bool) -> torch.optim.Adam:
    # fused: one kernel per step on CPU and CUDA (torch >= 2.4); capturable (only when the step
    # will be captured: torch warns that it is slower otherwise) keeps Adam's state on the device
    kw = {"fused": True} if device.type in ("cpu", "cuda") else {}
    return torch.optim.Adam(params, lr=lr, capturable=capturable, **kw)


def _rounding_optimizer(layers: list[QuantLayer], cfg: CalibConfig, device: torch.device,
                        capturable: bool) -> torch.optim.Adam:
    """The layers' weights switched to AdaRound's soft rounding, and Adam over its variables."""
    for layer in layers:
        layer.wq.start_adaround(layer.weight)
    return _adam([layer.wq.alpha for layer in layers], cfg.lr_round, device, capturable)


def _step_size_optimizer(scales: list[Tensor], cfg: CalibConfig, device: torch.device,
                         capturable: bool) -> torch.optim.Adam | None:
    """Adam over the activation step sizes, its lr a device tensor the schedule writes; None
    when there are none or lr_act is 0."""
    if not (scales and cfg.lr_act > 0):
        return None
    for p in scales:
        p.requires_grad_(True)
    opt = _adam(scales, cfg.lr_act, device, capturable)
    # a tensor lr, written from the schedule on the device each step (set after the
    # constructor, whose range check would read a tensor lr on the host)
    # float32: CUDA's fused Adam reads a tensor lr as float
    opt.param_groups[0]["lr"] = torch.tensor(cfg.lr_act, dtype=torch.float32, device=device)
    return opt


def _index(t: Tensor, idx: Tensor) -> Tensor:
    return t[idx]


@dataclass(frozen=True)
class Learned:
    """What a step learns: ``layers``' rounding and ``module``'s activation step sizes. ``module``
    is a reconstruction unit, or one of its layers (layer-wise methods)."""

    module: nn.Module
    layers: list[QuantLayer]


@dataclass(frozen=True)
class Caches:
    """The module's cached inputs and targets over the calibration set: ``x_q`` its quantized
    inputs, ``x_fp`` its FP inputs (QDrop's; None without dropping), ``y_f`` its FP outputs.
    ``stage(t, idx)`` gives ``t[idx]`` on the device (``t`` may live in host memory, see
    clcalib.recon.placement)."""

    x_q: Tensor
    x_fp: Tensor | None
    y_f: Tensor
    stage: Callable[[Tensor, Tensor], Tensor] = _index


@dataclass(frozen=True)
class StepSettings:
    """How a step learns: the config's rates, schedule and batch, ``round_weight`` (the rounding
    regulariser's weight), the unit's ``terms`` beside its MSE (None: the MSE alone, weighted 1),
    and ``capturable``: the step will be captured (clcalib.recon.graphed)."""

    cfg: CalibConfig
    round_weight: float
    terms: Terms | None = None
    capturable: bool = False

    @property
    def rec_weight(self) -> float:
        """The weight of the reconstruction MSE: the terms say it."""
        return self.terms.rec_weight if self.terms is not None else 1.0


class Step:
    """Learns ``learned`` (rounding: Adam, lr_round; activation step sizes: Adam, lr_act on the
    schedule) so that ``module(x_q)`` matches ``y_f`` over ``caches``, drawing batches from
    ``gen`` on ``device``. ``close`` hardens the rounding and freezes the step sizes."""

    def __init__(self, learned: Learned, caches: Caches, settings: StepSettings, gen: torch.Generator,
                 device: torch.device):
        self.learned, self.caches, self.settings = learned, caches, settings
        self.gen, self.device = gen, device
        cfg = settings.cfg
        self.schedule = Schedule(cfg, cfg.iters, device)
        self.opt_w = _rounding_optimizer(learned.layers, cfg, device, settings.capturable)
        self.act_scales = [q.scale for q in learned.module.modules() if isinstance(q, ActQuantizer) and q.initialized]
        self.opt_a = _step_size_optimizer(self.act_scales, cfg, device, settings.capturable)
        # sums since the last progress report, on the device (no host sync per iteration)
        self.rec_sum = torch.zeros((), device=device)
        # per added term, its sum since the last report, in place (a graph replay adds into it),
        # and which terms came since then (cl_calib.every may skip a whole window); `last_keys`:
        # those of the latest call, which a replay of its graph adds again (recon.graphed)
        self.added_sums: dict[str, Tensor] = {}
        self.added_since: set[str] = set()
        self.last_keys: set[str] = set()
        # what is kept of each held term from its last turn: (variable, gradient) pairs and its
        # value, in tensors made on its first turn and rewritten in place on later ones (a graph
        # that adds them reads the same memory on every replay)
        self.kept: dict[str, tuple[list[tuple[Tensor, Tensor]], Tensor]] = {}
        self.every = getattr(settings.terms, "every", 1) if settings.terms is not None else 1

    def _first_seen(self, what: str) -> None:
        # made inside a capture, its zero-fill would be replayed every iteration: fail the capture
        # instead (the step then runs eagerly and exactly); iteration 0, eager, makes them all
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{what} first seen inside a CUDA graph capture")

    def _add_to_sums(self, key: str, val: Tensor) -> None:
        if key not in self.added_sums:
            self._first_seen(f"the loss term {key!r}")
            self.added_sums[key] = torch.zeros_like(val)
        self.added_sums[key].add_(val)
        self.last_keys.add(key)

    def _keep(self, key: str, val: Tensor) -> None:
        """A held term's turn: its gradient w.r.t. the learned variables, and its value, kept."""
        params = self._learned_params()
        grads = torch.autograd.grad(val, params, retain_graph=True, allow_unused=True)
        if key not in self.kept:  # the first turn
            self._first_seen(f"the held term {key!r}")
            self.kept[key] = ([(p, g.detach().clone()) for p, g in zip(params, grads, strict=True) if g is not None],
                              val.detach().clone())
            return
        pairs, value = self.kept[key]
        got = {id(p): g for p, g in zip(params, grads, strict=True) if g is not None}
        if got.keys() != {id(p) for p, _ in pairs}:
            raise RuntimeError(f"the held term {key!r} reached other variables than on its first turn")
        for p, g in pairs:
            g.copy_(got[id(p)])
        value.copy_(val.detach())

    def _learned_params(self) -> list[Tensor]:
        """The variables the optimisers step: rounding, then activation step sizes."""
        return [p for g in self.opt_w.param_groups for p in g["params"]] + (
            [p for g in self.opt_a.param_groups for p in g["params"]] if self.opt_a is not None else [])

    def batch(self) -> tuple[Tensor, Tensor]:
        """A random batch of quantized inputs; with QDrop each element FP with drop_prob."""
        c, cfg = self.caches, self.settings.cfg
        n = len(c.x_q)
        idx = torch.randint(n, (min(cfg.batch_size, n),), generator=self.gen, device=self.device)
        inp = c.stage(c.x_q, idx)
        if c.x_fp is not None:
            keep_fp = torch.rand(inp.shape, generator=self.gen, device=self.device) < cfg.drop_prob
            inp = torch.where(keep_fp, c.stage(c.x_fp, idx), inp)
        return idx, inp

    def phase(self, it: int) -> tuple[bool, bool]:
        """What iteration ``it`` does beside the MSE, known on the host: the rounding regulariser
        (after the warm-up), and the terms' turn (``Terms.every``)."""
        return self.schedule.regularized(it), it % self.every == 0

    def __call__(self, it: int) -> None:
        """Iteration ``it``: loss = rec_weight * MSE + the unit's terms + rounding regulariser
        (after the warm-up); one step of each optimiser."""
        s, layers = self.settings, self.learned.layers
        regularized, turn = self.phase(it)
        self.last_keys = set()
        row = self.schedule.next_row()
        idx, inp = self.batch()
        target = self.caches.stage(self.caches.y_f, idx)
        beta = row[Schedule.BETA] if regularized else None
        for layer in layers:
            layer.wq.set_regularizer(beta, s.round_weight)
        out = self.learned.module(inp)
        rec = rec_loss(out, target)
        loss = s.rec_weight * rec
        if s.terms is not None:
            held = getattr(s.terms, "held", frozenset())
            came = s.terms(out, target, idx, turn) if self.every > 1 else s.terms(out, target, idx)
            for key, val in came.items():
                if key in held:  # its gradient from this turn, added on every iteration until the next
                    self._keep(key, val)
                else:
                    loss = loss + val
                self._add_to_sums(key, val.detach())
            for key, (_, val) in self.kept.items():
                if key not in came:  # its pull is in this iteration too, so is its value in the curve
                    self._add_to_sums(key, val)
        if regularized and s.round_weight > 0:
            loss = loss + sum(layer.wq.last_reg for layer in layers)
        self.opt_w.zero_grad(set_to_none=True)
        if self.opt_a is not None:
            self.opt_a.zero_grad(set_to_none=True)
        loss.backward()
        for pairs, _ in self.kept.values():
            for p, g in pairs:
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        self.opt_w.step()
        if self.opt_a is not None:
            self.opt_a.param_groups[0]["lr"].copy_(row[Schedule.LR_ACT])
            self.opt_a.step()
        self.rec_sum.add_(rec.detach())
        self.added_since |= self.last_keys

    def take_sums(self) -> tuple[Tensor, dict[str, Tensor]]:
        """The summed losses since the last call (still on the device), then zero them: the
        MSE's, and each added term's that came since then."""
        rec = self.rec_sum.clone()
        self.rec_sum.zero_()
        added = {k: self.added_sums[k].clone() for k in self.added_since}
        for v in self.added_sums.values():
            v.zero_()
        self.added_since = set()
        return rec, added

    def close(self) -> None:
        # drop what may live in a CUDA graph's private memory (gradients, the last regulariser,
        # the schedule's beta) so the pool is freed with the graph
        self.kept = {}
        for p in self.act_scales:
            p.grad = None
            p.requires_grad_(False)
        for layer in self.learned.layers:
            layer.wq.last_reg = None
            layer.wq.set_regularizer(None, 0.0)
            if layer.wq.alpha is not None:
                layer.wq.alpha.grad = None
                layer.wq.harden()
