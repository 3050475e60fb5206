"""Unit-by-unit calibration: capture inputs, initialise quantizers, reconstruct, harden.

``on_progress`` may raise clcalib.errors.Canceled; it propagates out between iterations.
Each unit sees the outputs of the already-quantized units before it; its FP targets are
captured once. Per-unit random generators are seeded from (seed, unit index), so a run that
resumes after unit k gives exactly the result of an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from clcalib.config import CalibConfig, Granularity
from clcalib.errors import ConfigError
from clcalib.graph.partition import QuantModel
from clcalib.progress import ProgressCallback, ProgressEvent
from clcalib.quant.activation import ActQuantizer
from clcalib.quant.layer import QuantLayer, QuantUnit
from clcalib.quant.switch import dropping, frozen, observing, quantization
from clcalib.recon.capture import capture, outputs_of
from clcalib.recon.chain import Chain, probe, through_gap
from clcalib.recon.graphed import GraphedStep, can_capture, terms_capturable
from clcalib.recon.losses import rec_loss
from clcalib.recon.phases import PhaseClock
from clcalib.recon.placement import (
    BYTES,
    DEVICE_SHARE,
    CachePlan,
    Stager,
    cache_bytes,
    free_device_bytes,
    plan_caches,
    working_bytes,
)
from clcalib.recon.step import Caches, Learned, Step, StepSettings, Terms

OBSERVE_SAMPLES = 256  # activation ranges are searched on this many calibration samples
EVAL_BATCH = OBSERVE_SAMPLES  # the error pass's first batch is the ranges' sample (Reconstructor._unit_error)


@dataclass
class UnitReport:
    name: str
    loss_before: float  # rec_loss on the calibration set (its first OBSERVE_SAMPLES images for range-only methods), quantized inputs, nearest rounding
    loss_after: float  # the same after reconstruction (hard rounding)
    seconds: float
    extra: dict[str, list[float]] = field(default_factory=dict)  # curves of the unit's terms (report key "extra")
    caches: str = "device"  # where its cached inputs/outputs lived: "device" or "host" (recon.placement)
    steps: str = "eager"  # how its steps ran: "graph" (CUDA graph replays), "eager", or "none"; a
    # capture that failed after an earlier one succeeded: "eager" (its later steps all ran eagerly)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class UnitContext:
    """What a unit's terms (PD-Quant, CL-Calib; clcalib.recon.terms) may use."""

    qmodel: QuantModel
    index: int
    unit: QuantUnit
    fp_out: Tensor  # FP outputs of the unit over the whole calibration set (device or host memory)
    config: CalibConfig
    device: torch.device  # where the unit runs


TermsFactory = Callable[[UnitContext], Terms | None]  # None: the unit gets no terms


class Reconstructor:
    def __init__(self, qmodel: QuantModel, data: Tensor, config: CalibConfig, round_weight: float,
                 on_progress: ProgressCallback | None = None, terms: TermsFactory | None = None,
                 clock: PhaseClock | None = None):
        self.qm, self.data, self.cfg = qmodel, data, config
        self.clock = clock or PhaseClock(data.device)
        self.round_weight = round_weight
        self.on_progress = on_progress or (lambda e: None)
        self.terms = terms
        self.units = qmodel.units()
        self.device = data.device
        self.t0 = time.perf_counter()
        self.chain: Chain | None = probe(qmodel, self.units, data[:2])
        self._carry: _Carry | None = None  # the next unit's inputs, computed by the unit before it

    def _emit(self, **kw) -> None:
        self.on_progress(ProgressEvent(num_units=len(self.units), iters=self.cfg.iters,
                                       elapsed_s=time.perf_counter() - self.t0, **kw))

    def run_unit(self, k: int) -> UnitReport:
        cfg, unit = self.cfg, self.units[k]
        name = self.qm.unit_names[k]
        t = time.perf_counter()
        self._emit(stage="prepare", unit=k, unit_name=name)
        clock = self.clock
        with frozen(self.qm):
            with clock("inputs"):
                plan = self._plan(k)
                # host plan: kept in (unpinned) host memory; the Stager gathers each batch into a
                # pinned buffer (torch's pinned allocator rounds blocks up to powers of two and keeps them)
                store = self.device if plan.where == "device" else torch.device("cpu")
                learns = cfg.method.reconstructs and cfg.iters > 0
                # ranges only (minmax, mse, iters 0): the quantizers see OBSERVE_SAMPLES images, so the
                # rest would only feed the unit's error figure, at a full prefix pass per unit each
                data = self.data if learns else self.data[:OBSERVE_SAMPLES]
                x_q, x_f, y_f = self._inputs(k, data, store)
                # the error pass over the finished unit also gives the next unit's quantized inputs
                # when its input is this unit's output (recon.chain): no prefix pass for it
                feed = self.chain.feeds[k + 1] if self.chain is not None and k + 1 < len(self.units) else "prefix"
                chained = feed != "prefix"
                keep = self._carry_store(store, k, feed, len(y_f)) if chained else None
            # its first batch sets the unit's activation ranges (OBSERVE_SAMPLES images)
            observe = [q for q in unit.act_quantizers() if not q.initialized]
            with clock("error"):
                before, out_q = self._unit_error(unit, x_q, y_f, keep=None if learns else keep, observe=observe)
            extra: dict[str, list[float]] = {}
            executor, drop = "none", None
            if learns:
                gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 100_003 + k)
                if cfg.method.spec.granularity is Granularity.LAYER:
                    for layer in unit.layers():  # layer-wise inside the unit
                        with clock("inputs"):
                            lx_q, _ = capture(unit, layer, x_q, EVAL_BATCH, quant=True, outputs=False, device=self.device, store=store)
                            _, ly_f = capture(unit, layer, x_f, EVAL_BATCH, quant=False, outputs=True, device=self.device, store=store)
                        with clock("loop"):
                            executor = self._optimize(k, layer, [layer], lx_q, None, ly_f, gen, extra, plan)
                else:
                    drop = x_f if cfg.method.spec.drops_input and cfg.drop_prob > 0 else None
                    with clock("loop"):
                        executor = self._optimize(k, unit, unit.layers(), x_q, drop, y_f, gen, extra, plan)
                x_f = drop = None  # the next unit's FP inputs are y_f: free x_f before the error pass
                with clock("error"):
                    after, out_q = self._unit_error(unit, x_q, y_f, keep=keep)
            else:
                after = before
            if feed == "direct":
                self._carry = _Carry(k + 1, out_q, y_f)
            elif feed == "gap":
                gap = partial(through_gap, self.qm, self.chain, self.units, k + 1, batch=EVAL_BATCH,
                              device=self.device, store=keep)
                with clock("handover"):
                    self._carry = _Carry(k + 1, gap(out_q, quant=True), gap(y_f, quant=False))
        report = UnitReport(name, before, after, time.perf_counter() - t, extra, plan.where, executor)
        self._emit(stage="unit_done", unit=k, unit_name=name, iteration=cfg.iters, loss=after)
        return report

    def _inputs(self, k: int, data: Tensor, store: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Unit k's quantized and FP inputs and FP outputs over ``data``: from the unit before it
        when the chain holds (recon.chain), else from the network's prefix."""
        unit, carry, self._carry = self.units[k], self._carry, None
        if carry is not None and carry.unit == k:
            x_q, x_f = carry.x_q.to(store), carry.x_f.to(store)
            return x_q, x_f, outputs_of(unit, x_f, EVAL_BATCH, quant=False, device=self.device, store=store)
        x_q, _ = capture(self.qm, unit, data, EVAL_BATCH, quant=True, outputs=False, store=store)
        x_f, y_f = capture(self.qm, unit, data, EVAL_BATCH, quant=False, outputs=True, store=store)
        return x_q, x_f, y_f

    def _carry_store(self, store: torch.device, k: int, feed: str, n: int) -> torch.device:
        """Where the next unit's inputs wait: beside this unit's caches, or in host memory when
        the device has no room left for them: this unit's quantized outputs, and for a gap feed
        the gap's quantized and FP results too (their size is the next unit's input's)."""
        free = free_device_bytes(self.device)
        if store.type == "cpu" or free is None:
            return store
        need = n * self.chain.out_numel[k] * BYTES
        if feed == "gap":
            need += 2 * n * self.chain.in_numel[k + 1] * BYTES
        return store if need <= free * DEVICE_SHARE else torch.device("cpu")

    def _plan(self, k: int) -> CachePlan:
        """Where unit k's caches live, from one sample's shapes and the free device memory."""
        unit = self.units[k]
        if self.chain is not None:
            in_n, out_n = self.chain.in_numel[k], self.chain.out_numel[k]
        else:
            x1, y1 = capture(self.qm, unit, self.data[:1], 1, quant=False, outputs=True)
            in_n, out_n = x1[0].numel(), y1[0].numel()
        layer_wise = self.cfg.method.spec.granularity is Granularity.LAYER
        free = free_device_bytes(self.device)
        carry = self._carry
        if free is not None and carry is not None and carry.unit == k:  # counted in cache_bytes: not twice
            free += sum(t.numel() * t.element_size() for t in (carry.x_q, carry.x_f) if t.device == self.device)
        return plan_caches(self.cfg.cache_placement, cache_bytes(len(self.data), in_n, out_n, layer_wise),
                           working_bytes(self.cfg.batch_size, in_n, out_n, len(unit.layers())), free)

    @torch.no_grad()
    def _unit_error(self, unit: nn.Module, x: Tensor, y: Tensor, keep: torch.device | None = None,
                    observe: list[ActQuantizer] = ()) -> tuple[float, Tensor | None]:
        """rec_loss of the quantized ``unit(x)`` against ``y`` over the set; with ``keep``, also
        those outputs, stored there (the next unit's quantized inputs when the chain holds). The
        ``observe`` quantizers set their ranges from the first batch, the OBSERVE_SAMPLES first
        images, as it passes (each sees its input already quantized upstream in the unit)."""
        tot = torch.zeros((), device=self.device)
        outs = []
        with quantization(unit, True):
            for i in range(0, len(x), EVAL_BATCH):
                xb, yb = x[i : i + EVAL_BATCH].to(self.device), y[i : i + EVAL_BATCH].to(self.device)
                with observing(observe if i == 0 else []):
                    out = unit(xb)
                tot += rec_loss(out, yb) * len(xb)
                if keep is not None:
                    outs.append(out.to(keep))
        return float(tot / len(x)), (torch.cat(outs) if keep is not None else None)

    def _optimize(self, k: int, module: nn.Module, layers: list[QuantLayer], x_q: Tensor,
                  x_fp: Tensor | None, y_f: Tensor, gen: torch.Generator, extra: dict, plan: CachePlan) -> str:
        """Learn ``layers``' rounding and ``module``'s activation step sizes so that
        ``module(x_q)`` matches ``y_f``, then harden the rounding. ``x_fp``: QDrop's FP inputs.
        Returns how the steps ran: "graph" (captured and replayed, no capture failed) or "eager"."""
        cfg, iters = self.cfg, self.cfg.iters
        terms = self._unit_terms(k, module, y_f)
        graphed = cfg.step_capture == "auto" and can_capture(
            self.device, plan.where == "device", terms_capturable(terms))
        step = Step(Learned(module, layers), Caches(x_q, x_fp, y_f, Stager(self.device, host=plan.where == "host")),
                    StepSettings(cfg, self.round_weight, terms, capturable=graphed), gen, self.device)
        run = GraphedStep(step) if graphed else step
        progress = _Progress(self, k, step, iters)
        # official QDrop drops at every activation quantizer of the unit, not only its input
        inner = [q for q in module.modules() if isinstance(q, ActQuantizer)] if x_fp is not None and cfg.drop_scope == "all" else []
        try:
            with dropping(inner, cfg.drop_prob, gen):
                for it in range(iters):
                    run(it)
                    progress.after(it, extra)
        finally:
            step.close()
        return "graph" if graphed and run.captures and not run.failed else "eager"

    def _unit_terms(self, k: int, module: nn.Module, y_f: Tensor) -> Terms | None:
        """The unit's PD/CL terms, None when there are none."""
        unit = self.units[k]  # terms need the unit's output: the unit, or its one layer (adaround)
        if self.terms is None or not (module is unit or module is unit.body):
            return None
        return self.terms(UnitContext(self.qm, k, unit, y_f, self.cfg, self.device))


@dataclass
class _Carry:
    unit: int  # the unit these are the inputs of
    x_q: Tensor
    x_f: Tensor


class _Progress:
    """Reads the step's loss sums and reports their mean every ``every`` iterations: one host
    sync per reporting window, not per iteration."""

    def __init__(self, rec: Reconstructor, k: int, step: Step, iters: int):
        self.rec, self.k, self.step, self.iters = rec, k, step, iters
        self.every = max(1, min(500, iters // 20))
        self.t = time.perf_counter()

    def after(self, it: int, curves: dict) -> None:
        if (it + 1) % self.every and it + 1 != self.iters:
            return
        done = (it % self.every) + 1
        rec_sum, added = self.step.take_sums()
        mean = float(rec_sum) / done
        for key, v in added.items():
            curves.setdefault(key, []).append(float(v) / done)
        bad = [k for k, v in [("reconstruction", mean)] + [(k, c[-1]) for k, c in curves.items() if k in added]
               if not math.isfinite(v)]
        if bad:  # stop now: the rest of the run, and its export, would only carry NaN forward
            raise ConfigError(
                f"unit {self.rec.qm.unit_names[self.k]}: the {' and '.join(bad)} loss became non-finite by iteration "
                f"{it + 1}; a setting is too extreme for this model (lr_round, lr_act, round_weight, beta, "
                "cl_calib.lambda/tau, pdquant.pd_weight/temperature): bring it toward its default")
        r = self.rec
        rate = (time.perf_counter() - self.t) / (it + 1)
        remaining = (self.iters - it - 1) * rate + (len(r.units) - self.k - 1) * self.iters * rate
        r._emit(stage="reconstruct", unit=self.k, unit_name=r.qm.unit_names[self.k], iteration=it + 1, loss=mean,
                eta_s=remaining)
