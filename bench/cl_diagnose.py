"""Diagnostics of the CL-Calib term (issue 17): does L_CL carry a signal, and where to?

Runs one real calibration (resnet18 on the Fashion-MNIST calibration zip, the benchmark's path)
with the given ``cl_calib`` block and, per reconstruction unit:

* at the first, middle and last iteration of the unit's schedule: the gradient norm that
  ``lambda * L_CL`` sends to the AdaRound variables (``layer.wq.alpha`` of the unit's layers)
  and to the activation step sizes (``ActQuantizer.scale``), divided by the norm the
  reconstruction term (``rec_weight * MSE``) sends to the same parameters; and the cosine
  between the two gradients (does CL pull the same way as the MSE?);
* the unweighted L_CL of that batch and its parts ``pos`` (attraction), ``neg`` (repulsion) and,
  for ``relational``, ``const`` (the entropy of the FP target), ``L = pos + neg - const``;
* at the last iteration, the response of L_CL to the quantized output moved on purpose on that
  batch: ``z = z_f + eps * rms(z_f) * noise`` (fixed Gaussian noise, relative sizes ``eps``) and
  ``z = z_f + t * (z_q - z_f)`` (the actual quantization error scaled by t); L_CL must rise with
  eps and t, and be lowest at z = z_f.

    PYTHONPATH=. python -m bench.cl_diagnose --bits W2A2 --iters 200 \\
        --cl '{"mapping":"fp_tail","tail_end":"logits","critic":"nce","negatives":"batch","lambda":0.1,"tau":0.5}' \\
        --out bench/results/cl_diagnose_nce.json

Writes the JSON (per-unit rows) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from bench.accuracy import prepare_data
from clcalib.calibration import calibrate
from clcalib.config import CalibConfig
from clcalib.data import load_calibration
from clcalib.graph.registry import build_model, read_state_dict
from clcalib.quant.activation import ActQuantizer
from clcalib.recon.losses import rec_loss
from clcalib.recon.terms.contrastive import contrastive_parts, embed
from clcalib.recon.terms.unit import unit_terms
from clcalib.testing import PREPROCESS, REFERENCE

EPS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
SCALE = (0.0, 0.5, 1.0, 2.0, 4.0)


def _norm(grads) -> float:
    sq = [g.pow(2).sum() for g in grads if g is not None]
    return math.sqrt(float(sum(sq))) if sq else 0.0


def _flat(grads, params) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params, strict=True)])


class _Probe:
    """Wraps the unit's terms; at the probed iterations measures gradients and parts."""

    def __init__(self, ctx, inner, rows: list):
        self.ctx, self.inner, self.it = ctx, inner, 0
        self.iters = ctx.config.iters
        self.probe_at = {0: "start", self.iters // 2: "mid", self.iters - 1: "end"}
        self.row = {"unit": ctx.qmodel.unit_names[ctx.index]}
        rows.append(self.row)
        self.rec_w = self.rec_weight = inner.rec_weight  # the engine weights its MSE by this
        self.every, self.held = inner.every, inner.held  # the step picks the turns and holds by these
        self.noise_gen = torch.Generator(device=ctx.fp_out.device).manual_seed(1234 + ctx.index)

    def _embed_q(self, z):
        inner = self.inner
        return embed(inner.tail(z) if inner.mapping is None else inner.mapping(z))

    def _parts(self, e_q, idx, target):
        inner, cl = self.inner, self.inner.cl_loss
        e_f = inner.fp_embed[idx] if inner.fp_embed is not None else embed(inner.mapping(target))
        bank = inner.fp_embed if cl.use_bank else None
        gen = None
        if inner.gen is not None:  # do not consume the run's own generator
            gen = torch.Generator(device=inner.gen.device).manual_seed(99)
        p = contrastive_parts(e_q, e_f, tau=cl.tau, critic=cl.critic, bank=bank, bank_index=idx,
                              num_negatives=cl.num_negatives, calib_size=cl.calib_size,
                              symmetric=cl.symmetric, generator=gen)
        return {k: float(v) for k, v in p.items()}

    def __call__(self, out_q, target, idx, turn=None):
        terms = self.inner(out_q, target, idx, turn)
        where = self.probe_at.get(self.it)
        self.it += 1
        if where is None or "cl" not in terms:
            return terms
        unit = self.ctx.unit
        alphas = [layer.wq.alpha for layer in unit.layers() if layer.wq.alpha is not None]
        scales = [q.scale for q in unit.modules() if isinstance(q, ActQuantizer) and q.initialized and q.scale.requires_grad]
        rec = self.rec_w * rec_loss(out_q, target)
        stats = {}
        for name, params in (("alpha", alphas), ("act", scales)):
            if not params:
                continue
            g_cl = torch.autograd.grad(terms["cl"], params, retain_graph=True, allow_unused=True)
            g_rec = torch.autograd.grad(rec, params, retain_graph=True, allow_unused=True)
            n_cl, n_rec = _norm(g_cl), _norm(g_rec)
            a, b = _flat(g_cl, params), _flat(g_rec, params)
            cos = float((a @ b) / (a.norm() * b.norm())) if n_cl > 0 and n_rec > 0 else float("nan")
            stats[f"{name}_ratio"] = n_cl / n_rec if n_rec > 0 else float("inf")
            stats[f"{name}_cos"] = cos
            stats[f"{name}_gcl"], stats[f"{name}_grec"] = n_cl, n_rec
        with torch.no_grad():
            stats.update({f"L_{k}": v for k, v in self._parts(self._embed_q(out_q), idx, target).items()})
            stats["rec"] = float(rec)
            if where == "end":
                rms = target.pow(2).mean().sqrt()
                noise = torch.randn(target.shape, generator=self.noise_gen, device=target.device)
                self.row["perturb_noise"] = {str(e): self._parts(self._embed_q(target + e * rms * noise), idx, target)["loss"]
                                             for e in EPS}
                err = out_q.detach() - target
                self.row["perturb_error"] = {str(t): self._parts(self._embed_q(target + t * err), idx, target)["loss"]
                                             for t in SCALE}
        self.row[where] = stats
        return terms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--bits", default="W2A2")
    p.add_argument("--method", default="qdrop")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cl", required=True, help="the JSON cl_calib block (enabled is set)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cl = {**json.loads(a.cl), "enabled": True}
    cfg = CalibConfig.model_validate({"method": a.method, "w_bits": int(a.bits[1]), "a_bits": int(a.bits[3]),
                                      "iters": a.iters, "seed": a.seed, "device": "cpu", "calib_size": 1024,
                                      "preprocess": PREPROCESS, "cl_calib": cl})
    calib_zip, _ = prepare_data()
    model = build_model(a.model, 10, read_state_dict(REFERENCE / f"fmnist_{a.model}.safetensors"))
    data = load_calibration(calib_zip, cfg.preprocess, cfg.calib_size, cfg.calib_draw)
    rows: list = []

    def factory(ctx):
        inner = unit_terms(ctx)
        if inner is None or inner.cl_loss is None:
            return inner
        return _Probe(ctx, inner, rows)

    t = time.perf_counter()
    res = calibrate(model, data, cfg, terms=factory)
    for r, u in zip(rows, [u for u in res.units if "cl" in u.extra], strict=False):
        curve = u.extra["cl"]
        lam = cfg.cl_calib.lambda_
        r["L_curve_first_last"] = [curve[0] / lam, curve[-1] / lam]
    out = {"model": a.model, "bits": a.bits, "method": a.method, "iters": a.iters, "seed": a.seed,
           "cl_calib": cfg.cl_calib.model_dump(mode="json", by_alias=True), "seconds": round(time.perf_counter() - t, 1),
           "units": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(markdown(out))
    return 0


def _f(x, nd=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}g}"


def markdown(d: dict) -> str:
    c = d["cl_calib"]
    head = (f"{d['model']} {d['bits']} {d['method']} {d['iters']} it/unit seed {d['seed']}; cl_calib critic={c['critic']} "
            f"mapping={c['mapping']} tail_end={c['tail_end']} negatives={c['negatives']} lambda={c['lambda']} tau={c['tau']}")
    lines = [head, "",
             "| unit | \\|g_CL\\|/\\|g_rec\\| alpha start/mid/end | cos(g_CL,g_rec) alpha s/m/e | \\|g_CL\\|/\\|g_rec\\| act s/m/e "
             "| L_CL s/m/e | pos / neg / const at end | L_CL vs noise eps " + "/".join(map(str, EPS))
             + " | L_CL vs t*(z_q-z_f), t " + "/".join(map(str, SCALE)) + " |",
             "|" + "---|" * 8]
    for r in d["units"]:
        ph = [r.get(k, {}) for k in ("start", "mid", "end")]
        end = ph[2]
        lines.append("| " + " | ".join([
            r["unit"],
            " / ".join(_f(x.get("alpha_ratio")) for x in ph),
            " / ".join(_f(x.get("alpha_cos"), 2) for x in ph),
            " / ".join(_f(x.get("act_ratio")) for x in ph),
            " / ".join(_f(x.get("L_loss"), 4) for x in ph),
            " / ".join(_f(end.get(k), 4) for k in ("L_pos", "L_neg", "L_const")),
            " / ".join(_f(v, 4) for v in r.get("perturb_noise", {}).values()),
            " / ".join(_f(v, 4) for v in r.get("perturb_error", {}).values()),
        ]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
