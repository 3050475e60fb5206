"""The terms a unit's loss gets beside its reconstruction MSE: PD-Quant's prediction difference
and CL-Calib's contrastive term. ``unit_terms(ctx)`` is the factory ``clcalib.calibrate`` hands
the engine; for each unit it returns ``UnitTerms`` (or None when the unit gets none), which the
engine calls per iteration, ``terms(out_q, target, idx, turn) -> {name: weighted term}``, adding every
value to its loss (a term named in ``held``: its gradient, held between turns; recon.step), with
its own MSE weighted by ``terms.rec_weight``, and reporting each name's curve
(``UnitReport.extra``, report.json's ``added_loss_curves``):

* ``"pd"``   ``pdquant.pd_weight * KL(softmax(tail(z_f)/T) || softmax(tail(z_q)/T))``, with
  ``tail`` the frozen FP rest of the network up to the logits and T ``pdquant.temperature``
  (null: 4, or 1 for MobileNet-like nets, as PD-Quant's scripts). With the defaults
  (pd_weight 10, reg_weight 0) a unit's loss is PD-Quant's ``rec + round + KL / 0.1``: the
  engine's reconstruction MSE is PD-Quant's regulariser.
* ``"pd_reg"`` only if ``pdquant.reg_weight > 0``: that much more of the same block-output
  regulariser.
* ``"cl"``   ``cl_calib.lambda * L_CL`` (``terms.contrastive``), embeddings ``embed(g(z))`` with
  ``g`` the configured mapping (``fp_tail``: the FP rest up to ``cl_calib.tail_end``). A unit with
  a ``"cl"`` term weights its MSE by ``cl_calib.rec_weight`` (0: L_CL alone); others keep 1.
  With ``cl_calib.every = k`` (``UnitTerms.every``) the term (and the tail's pass for it) comes
  on iterations 0, k, 2k, ... only (the step's ``turn``), weighted ``k * lambda``: the same
  average pull for 1/k of the tail's cost.
  With ``cl_calib.hold`` as well the term is weighted ``lambda`` and named in ``held``: the step
  adds its gradient from the last turn on every iteration until the next (a steady pull, where
  the pulses of k * lambda lost CL's gain).
  With ``cl_calib.tail_units = n`` the embedding is the FP network through the next n units only,
  average-pooled (``fp_tail_units``): a fraction of the whole tail's cost; with PD that shorter
  tail runs beside PD's logits tail.

On a GPU the engine captures the step, terms included, in a CUDA graph where the terms say
``capturable`` (PD always; CL unless negatives are sampled), so their kernels are replayed with
the step's instead of launched one by one from Python; with ``every`` > 1 the turns and the
iterations between them are two graphs.

The FP side never changes during a unit's reconstruction, and the engine's ``target`` is
``ctx.fp_out[idx]``: so the tail of every FP output (and its embedding, the bank) is computed
once per unit, and per iteration the tail runs once, on ``out_q``. PD and the ``fp_tail``
mapping share that call: with ``tail_end = "features"`` the features are computed once and the
final Linear (``fp_head``) turns them into the logits for PD.

Deviation from PD-Quant's code: its KL is taken on the unit's output for the fully quantized
input (a second forward pass), here on the engine's output for the QDrop-mixed input.

Rules for units:

* The final unit (the classifier): the logits tail is the identity, so PD compares the unit's
  own logits, and the ``fp_tail`` mapping embeds the logits whatever ``tail_end`` says (there
  are no features after the classifier).
* CL is skipped (no ``"cl"`` term) where it is undefined: fewer than 2 calibration samples (no
  other sample to be a negative), or ``negatives = batch`` with batches of 1; and where it adds
  nothing: ``lambda = 0``. PD is skipped when ``pd_weight`` and ``reg_weight`` are both 0.
* The engine asks only for whole units (and for one-layer units under layer-wise ``adaround``):
  inside a multi-layer block reconstructed layer by layer no term is added.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clcalib.config import CalibConfig
from clcalib.graph.partition import QuantModel, is_mobile_like
from clcalib.graph.tail import apply_chunked, fp_head, fp_tail, fp_tail_units
from clcalib.recon.engine import UnitContext
from clcalib.recon.terms.contrastive import ContrastiveLoss, build_bank, embed, get_mapping, pool
from clcalib.recon.terms.prediction_difference import pd_loss, pd_regularizer

__all__ = ["UnitTerms", "unit_terms", "pd_temperature"]

FP_CHUNK = 256  # samples per chunk when the FP side is mapped over the whole calibration set


def pd_temperature(cfg: CalibConfig, qmodel: QuantModel) -> float:
    """``pdquant.temperature``, or PD-Quant's choice when null: 1 for MobileNet-like nets, else 4."""
    if cfg.pdquant.temperature is not None:
        return cfg.pdquant.temperature
    return 1.0 if is_mobile_like(qmodel) else 4.0


class _Pooled(nn.Module):
    """A tail, then the average over its output's spatial dims (logits pass as they are)."""

    def __init__(self, tail: nn.Module):
        super().__init__()
        self.tail = tail

    def forward(self, z: Tensor) -> Tensor:
        return pool(self.tail(z))


class UnitTerms:
    """The terms of one unit and the weight of its MSE; FP-side values cached for the whole
    calibration set."""

    def __init__(self, ctx: UnitContext, pd: bool, cl: bool):
        cfg, qm, k = ctx.config, ctx.qmodel, ctx.index
        self.fp_out = ctx.fp_out
        self.pd = pd and cfg.pdquant.pd_weight > 0  # the KL term; pd_reg needs no tail
        self.reg_weight = cfg.pdquant.reg_weight if pd else 0.0
        self.cl_loss = None
        self.held: frozenset[str] = frozenset()
        self.every = 1  # terms on iterations 0, every, 2 * every, ... only (CL's, cl_calib.every)
        self.rec_weight = cfg.cl_calib.rec_weight if cl else 1.0  # trades the MSE for L_CL
        last = k == len(qm.unit_names) - 1
        cl_cfg = cfg.cl_calib
        # CL's own, shorter tail (tail_units): through the next units, pooled; PD keeps the logits
        short = cl and cl_cfg.mapping == "fp_tail" and cl_cfg.tail_units is not None
        self.cl_tail = _Pooled(fp_tail_units(qm, k, cl_cfg.tail_units)) if short else None
        tail_mapping = cl and cl_cfg.mapping == "fp_tail" and not short
        want_features = tail_mapping and cl_cfg.tail_end == "features" and not last
        # the one tail to the features/logits that runs per iteration, and what of its output each term uses
        self.tail: nn.Module | None = None
        self.head: nn.Module | None = None  # features -> logits, when CL stops at the features
        if want_features:
            self.tail = fp_tail(qm, k, "features")
            self.head = fp_head(qm) if self.pd else None
        elif self.pd or tail_mapping:
            self.tail = fp_tail(qm, k, "logits")
        dev = ctx.device  # fp_out may live in host memory (recon.placement); what is derived from it is small
        fp_tail_out = apply_chunked(self.tail, self.fp_out, FP_CHUNK, dev) if self.tail is not None else None
        self.fp_logits = None
        if self.pd:
            self.temperature = pd_temperature(cfg, qm)
            self.pd_weight = cfg.pdquant.pd_weight
            self.fp_logits = apply_chunked(self.head, fp_tail_out, FP_CHUNK) if self.head is not None else fp_tail_out
        if cl:
            m = len(self.fp_out)
            self.cl_loss = ContrastiveLoss.from_config(cl_cfg, calib_size=m)
            self.every = cl_cfg.every
            # on 1 of `every` iterations: k * lambda for the same mean pull, or with hold lambda, the
            # step adding the turn's gradient on each iteration until the next (recon.step)
            self.held = frozenset({"cl"}) if cl_cfg.hold else frozenset()  # the config asks every > 1
            self.cl_weight = cl_cfg.lambda_ * (1 if self.held else cl_cfg.every)
            # the embedding's map when it is not the features/logits tail (whose output is shared with PD)
            self.mapping = None if tail_mapping else self.cl_tail if short else get_mapping(cl_cfg.mapping)
            # FP embeddings of all M samples: the bank, and e_f of a batch by indexing
            self.fp_embed = None
            if tail_mapping:
                self.fp_embed = embed(fp_tail_out)
            elif self.cl_loss.use_bank or cl_cfg.mapping != "flatten":
                self.fp_embed = build_bank((c.to(dev) for c in self.fp_out.split(FP_CHUNK)), self.mapping)
            self.gen = None
            if cl_cfg.num_negatives is not None:
                self.gen = torch.Generator(device=dev).manual_seed(cfg.seed * 100_003 + k)
        self._checked = False
        # a CUDA graph may capture the step with these terms (clcalib.recon.graphed): every call
        # after the first (whose check syncs, in an eager warm-up run) with the same `turn` does
        # the same device work; not with sampled negatives (a generator the graph would have to
        # register)
        self.capturable = self.cl_loss is None or self.gen is None

    def __call__(self, out_q: Tensor, target: Tensor, idx: Tensor, turn: bool | None = None) -> dict[str, Tensor]:
        """The weighted terms for a batch; CL only on ``turn`` (iterations 0, every, 2 * every, ...),
        which a caller must pass when ``every`` > 1."""
        if turn is None:
            if self.every > 1:
                raise TypeError("these terms come on every k-th iteration: pass turn (recon.step.Step.phase)")
            turn = True
        if not self._checked:  # the FP caches stand for tail(target) only if target = fp_out[idx]
            if not torch.equal(target, self.fp_out[idx.to(self.fp_out.device)].to(target.device)):
                raise RuntimeError(
                    "unit terms expect the engine's target to be ctx.fp_out[idx]; it is not, so "
                    "the cached FP tail would be wrong"
                )
            self._checked = True
        terms: dict[str, Tensor] = {}
        cl = self.cl_loss is not None and turn
        tail_q = self.tail(out_q) if self.tail is not None and (self.pd or (cl and self.cl_tail is None)) else None
        if self.pd:
            logits_q = self.head(tail_q) if self.head is not None else tail_q
            terms["pd"] = self.pd_weight * pd_loss(logits_q, self.fp_logits[idx], self.temperature)
        if self.reg_weight > 0:
            terms["pd_reg"] = self.reg_weight * pd_regularizer(out_q, target)
        if cl:
            e_q = embed(tail_q if self.mapping is None else self.mapping(out_q))
            e_f = self.fp_embed[idx] if self.fp_embed is not None else embed(self.mapping(target))
            bank = self.fp_embed if self.cl_loss.use_bank else None
            # bank_index also keeps a sample drawn twice in one batch from being its own negative
            terms["cl"] = self.cl_weight * self.cl_loss(e_q, e_f, bank=bank, bank_index=idx, generator=self.gen)
        return terms


def unit_terms(ctx: UnitContext) -> UnitTerms | None:
    """The PD-Quant and CL-Calib terms of one unit (see the module doc), or None if it gets none."""
    cfg = ctx.config
    pd = cfg.method.spec.prediction_difference and (cfg.pdquant.pd_weight > 0 or cfg.pdquant.reg_weight > 0)
    m = len(ctx.fp_out)
    cl = (
        cfg.cl_calib.enabled
        and cfg.cl_calib.lambda_ > 0
        and m >= 2
        and not (cfg.cl_calib.negatives == "batch" and min(cfg.batch_size, m) < 2)
    )
    if not (pd or cl):
        return None
    return UnitTerms(ctx, pd, cl)
