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
    """A term (out * w).sum() on iterations 0, 2, 4, ... (every 2); ``held`` names it or not."""

    every = 2

    def __init__(self, w, held: bool):
        self.w, self.rec_weight = w, 1.0
        self.held = frozenset({"t"}) if held else frozenset()

    def __call__(self, out_q, target, idx, turn):
        return {"t": (out_q * self.w).sum() / len(out_q)} if turn else {}


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
    a(0), b(0)
    va, vb = a._learned_params(), b._learned_params()
    for p, q in zip(va, vb, strict=True):  # on the turn both take rec + term once
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6) and torch.allclose(p, q, atol=1e-5)
    kept = {p: g.clone() for p, g in a.kept["t"][0]}
    assert kept and all(g.abs().sum() > 0 for g in kept.values())
    a(1), b(1)  # the next iteration: a adds the kept gradient, b has no term
    for p, q in zip(va, vb, strict=True):
        expect = q.grad + kept[p] if p in kept else q.grad
        assert torch.allclose(p.grad, expect, rtol=1e-4, atol=1e-6)
    # the curve: the held term's value counts on the iteration between turns too (2 of 2)
    _, sums = a.take_sums()
    assert torch.allclose(sums["t"], 2 * a.kept["t"][1])
    memory = [g.data_ptr() for _, g in a.kept["t"][0]] + [a.kept["t"][1].data_ptr()]
    a(2)  # the second turn replaces the kept gradient, it does not add to it
    again = dict(a.kept["t"][0])
    assert again.keys() == kept.keys() and any(not torch.equal(again[p], kept[p]) for p in kept)
    # rewritten in place: a CUDA graph of the iterations between turns reads the same memory
    assert [g.data_ptr() for _, g in a.kept["t"][0]] + [a.kept["t"][1].data_ptr()] == memory


def test_the_host_knows_each_iterations_kind_and_a_held_term_may_be_captured():
    class Capturable(_OnTurns):
        capturable = True

    assert terms_capturable(None) and terms_capturable(Capturable(None, held=False))
    # a graph for the turns and one for the iterations between: the host picks by the iteration
    assert terms_capturable(Capturable(None, held=True))
    assert not terms_capturable(_OnTurns(None, held=True))  # not without saying so


def test_hold_weights_the_term_lambda_names_it_held_and_needs_every(small_net):  # noqa: F811
    qm, outs = small_net
    held = ut.unit_terms(_ctx(qm, outs, K, method="qdrop", cl_calib={"enabled": True, "every": 8, "hold": True}))
    pulses = ut.unit_terms(_ctx(qm, outs, K, method="qdrop", cl_calib={"enabled": True, "every": 8, "hold": False}))
    assert held.held == {"cl"} and pulses.held == frozenset()
    assert (held.cl_weight, pulses.cl_weight) == (10.0, 80.0)
    assert held.capturable and held.every == pulses.every == 8
    with pytest.raises(ValueError, match="hold keeps the term's gradient between its turns"):
        CalibConfig.model_validate({"cl_calib": {"enabled": True, "every": 1, "hold": True}})
    # hold left out follows every: the shipped form is held, every 1 alone the every-iteration form
    assert CalibConfig.model_validate({"cl_calib": {"enabled": True}}).cl_calib.model_dump(include={"every", "hold"}) \
        == {"every": 8, "hold": True}
    assert not CalibConfig.model_validate({"cl_calib": {"every": 1}}).cl_calib.hold
    assert not CalibConfig.model_validate({"cl_calib": {"every": 8, "hold": False}}).cl_calib.hold


def test_the_step_gives_the_terms_their_turns_from_the_iteration_number(small_net):  # noqa: F811
    qm, outs = small_net
    turns = []

    class Logged(_OnTurns):
        every = 3

        def __call__(self, out_q, target, idx, turn):
            turns.append(turn)
            return super().__call__(out_q, target, idx, turn)

    step = _step(copy.deepcopy(qm.units()[K]), outs[K - 1].detach(), outs[K].detach(), Logged(1.0, held=True))
    # (regularized, turn): the warm-up is 2 of the 10 iterations
    assert [step.phase(it) for it in (0, 1, 2, 3)] == [(False, True), (False, False), (True, False), (True, True)]
    for it in range(7):
        step(it)
    assert turns == [True, False, False, True, False, False, True]


def test_terms_written_for_three_arguments_still_work_and_periodic_ones_need_the_turn(small_net):  # noqa: F811
    qm, outs = small_net

    class ThreeArgs:  # a user's terms from before the turn existed (calibrate(terms=...))
        rec_weight = 1.0

        def __call__(self, out_q, target, idx):
            return {"t": out_q.square().mean()}

    step = _step(copy.deepcopy(qm.units()[K]), outs[K - 1].detach(), outs[K].detach(), ThreeArgs())
    step(0), step(1)
    assert step.take_sums()[1]["t"] > 0
    periodic = ut.unit_terms(_ctx(qm, outs, K, method="qdrop", cl_calib={"enabled": True, "every": 8, "hold": True}))
    idx = torch.tensor([0, 1])
    with pytest.raises(TypeError, match="pass turn"):
        periodic(outs[K][idx], outs[K][idx], idx)
    assert set(periodic(outs[K][idx], outs[K][idx], idx, turn=False)) == set()
