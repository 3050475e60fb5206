"""Unit-by-unit calibration: capture inputs, initialise quantizers, reconstruct, harden.

``on_progress`` may raise clcalib.errors.Canceled; it propagates out between iterations.
Each unit sees the outputs of the already-quantized units before it; its FP targets are
captured once. Per-unit random generators are seeded from (seed, unit index), so a run that
resumes after unit k gives exactly the result of an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from clcalib.config import CalibConfig, Granularity
from clcalib.graph.partition import QuantModel
from clcalib.progress import ProgressCallback, ProgressEvent
from clcalib.quant.activation import ActQuantizer
from clcalib.quant.layer import QuantLayer, QuantUnit
from clcalib.quant.switch import dropping, frozen, observing
from clcalib.recon.capture import capture
from clcalib.recon.losses import beta_at, rec_loss

OBSERVE_SAMPLES = 256  # activation ranges are searched on this many calibration samples
EVAL_BATCH = 256


def _fast_adam(t: Tensor) -> dict:
    # fused Adam exists for CPU and CUDA in torch >= 2.4; one kernel per step instead of ~10
    return {"fused": True} if t.device.type in ("cpu", "cuda") else {}


@dataclass
class UnitReport:
    name: str
    loss_before: float  # rec_loss on the calibration set, quantized inputs, nearest rounding
    loss_after: float  # the same after reconstruction (hard rounding)
    seconds: float
    extra: dict[str, list[float]] = field(default_factory=dict)  # curves of added loss terms

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class UnitContext:
    """What an added loss term (PD-Quant, CL-Calib) may use for one unit."""

    qmodel: QuantModel
    index: int
    unit: QuantUnit
    fp_out: Tensor  # FP outputs of the unit over the whole calibration set
    config: CalibConfig


ExtraLoss = Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]]  # (out_q, target, idx) -> terms
ExtraLossFactory = Callable[[UnitContext], ExtraLoss | None]


class Reconstructor:
    def __init__(self, qmodel: QuantModel, data: Tensor, config: CalibConfig, round_weight: float,
                 on_progress: ProgressCallback | None = None, extra_losses: ExtraLossFactory | None = None):
        self.qm, self.data, self.cfg = qmodel, data, config
        self.round_weight = round_weight
        self.on_progress = on_progress or (lambda e: None)
        self.extra_losses = extra_losses
        self.units = qmodel.units()
        self.t0 = time.perf_counter()

    def _emit(self, **kw) -> None:
        self.on_progress(ProgressEvent(num_units=len(self.units), iters=self.cfg.iters,
                                       elapsed_s=time.perf_counter() - self.t0, **kw))

    def run_unit(self, k: int) -> UnitReport:
        cfg, unit = self.cfg, self.units[k]
        name = self.qm.unit_names[k]
        t = time.perf_counter()
        self._emit(stage="prepare", unit=k, unit_name=name)
        with frozen(self.qm):
            x_q, _ = capture(self.qm, unit, self.data, EVAL_BATCH, quant=True, outputs=False)
            x_f, y_f = capture(self.qm, unit, self.data, EVAL_BATCH, quant=False, outputs=True)
            with torch.no_grad(), observing([q for q in unit.act_quantizers() if not q.initialized]):
                unit(x_q[:OBSERVE_SAMPLES])
            before = self._unit_error(unit, x_q, y_f)
            extra: dict[str, list[float]] = {}
            if cfg.method.reconstructs and cfg.iters > 0:
                gen = torch.Generator(device=self.data.device).manual_seed(cfg.seed * 100_003 + k)
                if cfg.method.spec.granularity is Granularity.LAYER:
                    for layer in unit.layers():  # layer-wise inside the unit
                        lx_q, _ = capture(unit, layer, x_q, EVAL_BATCH, quant=True, outputs=False)
                        _, ly_f = capture(unit, layer, x_f, EVAL_BATCH, quant=False, outputs=True)
                        self._optimize(k, layer, [layer], lx_q, None, ly_f, gen, extra)
                else:
                    drop = x_f if cfg.method.spec.drops_input and cfg.drop_prob > 0 else None
                    self._optimize(k, unit, unit.layers(), x_q, drop, y_f, gen, extra)
            after = self._unit_error(unit, x_q, y_f)
        report = UnitReport(name, before, after, time.perf_counter() - t, extra)
        self._emit(stage="unit_done", unit=k, unit_name=name, iteration=cfg.iters, loss=after)
        return report

    @torch.no_grad()
    def _unit_error(self, unit: nn.Module, x: Tensor, y: Tensor) -> float:
        tot = torch.zeros((), device=x.device)
        for i in range(0, len(x), EVAL_BATCH):
            tot += rec_loss(unit(x[i : i + EVAL_BATCH]), y[i : i + EVAL_BATCH]) * len(x[i : i + EVAL_BATCH])
        return float(tot / len(x))

    def _optimize(self, k: int, module: nn.Module, layers: list[QuantLayer], x_q: Tensor,
                  x_fp: Tensor | None, y_f: Tensor, gen: torch.Generator, extra: dict) -> None:
        """Learn ``layers``' rounding and ``module``'s activation step sizes so that
        ``module(x_q)`` matches ``y_f``, then harden the rounding. ``x_fp``: QDrop's FP inputs."""
        cfg, iters = self.cfg, self.cfg.iters
        step = _Step(module, layers, x_q, cfg)
        terms, rec_w = self._added_terms(k, module, y_f)
        progress = _Progress(self, k, x_q.device, iters)
        # official QDrop drops at every activation quantizer of the unit, not only its input
        inner = [q for q in module.modules() if isinstance(q, ActQuantizer)] if x_fp is not None and cfg.drop_scope == "all" else []
        try:
            with dropping(inner, cfg.drop_prob, gen):
                for it in range(iters):
                    idx, inp = self._batch(x_q, x_fp, gen)
                    beta = beta_at(it, iters, cfg.warmup, *cfg.beta)
                    rec, added = step.run(inp, y_f[idx], idx, beta, self.round_weight, terms, rec_w)
                    progress.add(it, rec, added, extra)
        finally:
            step.close()

    def _added_terms(self, k: int, module: nn.Module, y_f: Tensor):
        """The unit's PD/CL terms (None when there are none) and the weight of its MSE."""
        unit = self.units[k]  # added terms need the unit's output: the unit, or its one layer (adaround)
        terms = None
        if self.extra_losses is not None and (module is unit or module is unit.body):
            terms = self.extra_losses(UnitContext(self.qm, k, unit, y_f, self.cfg))
        # rec_weight trades MSE for L_CL; a unit that gets no CL term keeps its full MSE
        rec_w = self.cfg.cl_calib.rec_weight if self.cfg.cl_calib.enabled and terms is not None else 1.0
        return terms, rec_w

    def _batch(self, x_q: Tensor, x_fp: Tensor | None, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """A random batch of quantized inputs; with QDrop each element FP with drop_prob."""
        n = len(x_q)
        idx = torch.randint(n, (min(self.cfg.batch_size, n),), generator=gen, device=x_q.device)
        inp = x_q[idx]
        if x_fp is not None:
            keep_fp = torch.rand(inp.shape, generator=gen, device=inp.device) < self.cfg.drop_prob
            inp = torch.where(keep_fp, x_fp[idx], inp)
        return idx, inp


class _Step:
    """One optimisation step: AdaRound variables (Adam, lr_round) and activation step sizes
    (Adam, lr_act, cosine to 0); ``close`` hardens the rounding and freezes the step sizes."""

    def __init__(self, module: nn.Module, layers: list[QuantLayer], like: Tensor, cfg: CalibConfig):
        self.module, self.layers = module, layers
        for layer in layers:
            layer.wq.start_adaround(layer.weight)
        self.act_scales = [q.scale for q in module.modules() if isinstance(q, ActQuantizer) and q.initialized]
        self.opt_w = torch.optim.Adam([layer.wq.alpha for layer in layers], lr=cfg.lr_round, **_fast_adam(like))
        self.opt_a = self.sched = None
        if self.act_scales and cfg.lr_act > 0:
            for p in self.act_scales:
                p.requires_grad_(True)
            self.opt_a = torch.optim.Adam(self.act_scales, lr=cfg.lr_act, **_fast_adam(like))
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt_a, T_max=cfg.iters, eta_min=0.0)

    def run(self, inp: Tensor, target: Tensor, idx: Tensor, beta: float | None, round_weight: float,
            terms, rec_w: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss = rec_w * MSE + added terms + rounding regulariser (after warm-up); one step of
        each optimiser. Returns the MSE and the added terms, detached (no host sync)."""
        for layer in self.layers:
            layer.wq.set_regularizer(beta, round_weight)
        out = self.module(inp)
        rec = rec_loss(out, target)
        loss = rec_w * rec
        added: dict[str, Tensor] = {}
        if terms is not None:
            for key, val in terms(out, target, idx).items():
                loss = loss + val
                added[key] = val.detach()
        if beta is not None and round_weight > 0:
            loss = loss + sum(layer.wq.last_reg for layer in self.layers)
        self.opt_w.zero_grad(set_to_none=True)
        if self.opt_a is not None:
            self.opt_a.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_w.step()
        if self.opt_a is not None:
            self.opt_a.step()
            self.sched.step()
        return rec.detach(), added

    def close(self) -> None:
        for p in self.act_scales:
            p.requires_grad_(False)
        for layer in self.layers:
            if layer.wq.alpha is not None:
                layer.wq.harden()


class _Progress:
    """Sums the losses on the device and reports their mean every ``every`` iterations: one
    host sync per reporting window, not per iteration."""

    def __init__(self, rec: Reconstructor, k: int, device: torch.device, iters: int):
        self.rec, self.k, self.iters = rec, k, iters
        self.every = max(1, min(500, iters // 20))
        self.acc = torch.zeros((), device=device)
        self.added: dict[str, Tensor] = {}
        self.t = time.perf_counter()

    def add(self, it: int, rec: Tensor, added: dict[str, Tensor], curves: dict) -> None:
        self.acc += rec
        for key, v in added.items():
            self.added[key] = self.added.get(key, 0) + v
        if (it + 1) % self.every and it + 1 != self.iters:
            return
        done = (it % self.every) + 1
        mean = float(self.acc) / done
        for key, v in self.added.items():
            curves.setdefault(key, []).append(float(v) / done)
        self.acc.zero_()
        self.added.clear()
        r = self.rec
        rate = (time.perf_counter() - self.t) / (it + 1)
        remaining = (self.iters - it - 1) * rate + (len(r.units) - self.k - 1) * self.iters * rate
        r._emit(stage="reconstruct", unit=self.k, unit_name=r.qm.unit_names[self.k], iteration=it + 1, loss=mean,
                eta_s=remaining)
