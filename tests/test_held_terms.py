"""A term the step holds (cl_calib.hold): on its turn it is not in the loss, its gradient is kept
and added to the learned variables' own on that iteration and every one until its next turn."""

import copy

import pytest
import torch

import clcalib.recon.terms.unit as ut
from clcalib.config import CalibConfig
from clcalib.quant.layer import QuantLayer
from clcalib.recon.graphed import terms_capturable
from clcalib.recon.step import Caches, Learned, Step, StepSettings
from tests.test_terms import _ctx, small_net  # noqa: F401  (a fixture)

K = 3


class _OnTurns:
    """A term (out * w).sum() on iterations 0 and 2 (every 2); ``held`` names it or not."""

    def __init__(self, w, held: bool):
        self.w, self.calls, self.rec_weight = w, 0, 1.0
        self.held = frozenset({"t"}) if held else frozenset()

    def __call__(self, out_q, target, idx):
        self.calls += 1
        return {"t": (out_q * self.w).sum() / len(out_q)} if self.calls in (1, 3) else {}


def _step(unit, outs_in, outs_out, terms):
    layers = [m for m in unit.modules() if isinstance(m, QuantLayer)]
    cfg = CalibConfig.model_validate({"batch_size": 4, "iters": 10, "drop_prob": 0.5})
    gen = torch.Generator().manual_seed(0)
    return Step(Learned(unit, layers), Caches(outs_in, None, outs_out), StepSettings(cfg, 0.01, terms), gen,
                torch.device("cpu"))


def test_a_held_terms_gradient_is_added_on_the_iterations_after_its_turn(small_net):  # noqa: F811
    qm, outs = small_net
    unit_a, unit_b = copy.deepcopy(qm.units()[K]), copy.deepcopy(qm.units()[K])  # the fixture stays as it is
    x, y = outs[K - 1].detach(), outs[K].detach()
    w = torch.randn_like(y[0])
    a = _step(unit_a, x, y, _OnTurns(w, held=True))
    b = _step(unit_b, x, y, _OnTurns(w, held=False))  # the same term in the loss on its turn, then nothing
    a(False), b(False)
    va, vb = a._learned_params(), b._learned_params()
    for p, q in zip(va, vb, strict=True):  # on the turn both take rec + term once
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6) and torch.allclose(p, q, atol=1e-5)
    kept = dict(a.kept["t"][0])
    assert kept and all(g.abs().sum() > 0 for g in kept.values())
    a(False), b(False)  # the next iteration: a adds the kept gradient, b has no term
    for p, q in zip(va, vb, strict=True):
        expect = q.grad + kept[p] if p in kept else q.grad
        assert torch.allclose(p.grad, expect, rtol=1e-4, atol=1e-6)
    # the curve: the held term's value counts on the iteration between turns too (2 of 2)
    _, sums = a.take_sums()
    assert torch.allclose(sums["t"], 2 * a.kept["t"][1])
    a(False)  # the second turn replaces the kept gradient, it does not add to it
    again = dict(a.kept["t"][0])
    assert again.keys() == kept.keys() and any(not torch.equal(again[p], kept[p]) for p in kept)


def test_held_terms_are_never_captured():
    class Capturable(_OnTurns):
        capturable = True

    assert terms_capturable(None) and terms_capturable(Capturable(None, held=False))
    assert not terms_capturable(Capturable(None, held=True))  # a replay would never run the turns


def test_hold_weights_the_term_lambda_names_it_held_and_needs_every(small_net):  # noqa: F811
    qm, outs = small_net
    held = ut.unit_terms(_ctx(qm, outs, K, method="qdrop", cl_calib={"enabled": True, "every": 8, "hold": True}))
    pulses = ut.unit_terms(_ctx(qm, outs, K, method="qdrop", cl_calib={"enabled": True, "every": 8}))
    assert held.held == {"cl"} and pulses.held == frozenset()
    assert (held.cl_weight, pulses.cl_weight) == (10.0, 80.0)
    assert not held.capturable  # a host counter picks the turns
    with pytest.raises(ValueError, match="hold keeps the term's gradient between its turns"):
        CalibConfig.model_validate({"cl_calib": {"enabled": True, "hold": True}})
