"""PD-Quant and CL-Calib terms in the reconstruction engine (clcalib.recon.terms)."""

import math

import pytest
import torch
from torch import nn

import clcalib.recon.terms.unit as ut
from clcalib import calibrate
from clcalib.config import CalibConfig
from clcalib.graph.partition import QuantModel, QuantSpec
from clcalib.graph.registry import build_model, read_state_dict
from clcalib.graph.tail import fp_tail, fp_tail_units
from clcalib.quant.switch import observing
from clcalib.recon.engine import UnitContext
from clcalib.recon.terms.contrastive import contrastive_loss, embed, pool
from clcalib.recon.terms.prediction_difference import pd_loss
from clcalib.testing import REFERENCE, split

SMALL = {"iters": 3, "calib_size": 64, "batch_size": 16, "w_bits": 2, "a_bits": 4, "device": "cpu"}


class _Counted(nn.Module):
    """Counts forward calls of a tail, split by whether autograd is recording."""

    def __init__(self, inner, log, key):
        super().__init__()
        self.inner, self.log, self.key = inner, log, key

    def forward(self, z):
        self.log.append((self.key, torch.is_grad_enabled(), len(z)))
        return self.inner(z)


def _counting(mp, log):
    """Make unit_terms build counted tails."""
    real_tail, real_head = ut.fp_tail, ut.fp_head
    mp.setattr(ut, "fp_tail", lambda qm, k, end="logits": _Counted(real_tail(qm, k, end), log, ("tail", k, end)))
    mp.setattr(ut, "fp_head", lambda qm: _Counted(real_head(qm), log, ("head",)))


@pytest.fixture(scope="module")
def fmnist64():
    torch.set_num_threads(1)
    images, _ = split("train")
    x = torch.from_numpy(images[:64].copy()).float().div(255).unsqueeze(1).repeat(1, 3, 1, 1)
    return (x - 0.286) / 0.353


@pytest.fixture(scope="module")
def resnet18():
    return build_model("resnet18", 10, read_state_dict(REFERENCE / "fmnist_resnet18.safetensors"))


def _run(model, data, cfg, factory=None):
    log = []
    with pytest.MonkeyPatch.context() as mp:
        _counting(mp, log)
        result = calibrate(model, data, {**SMALL, **cfg}, terms=factory)
    return result, log


def _check_tail_once_per_iteration(result, log, iters):
    """Per unit: one tail call with gradient per iteration, and the FP side once (no gradient)."""
    by_unit = {}
    for key, grad, n in log:
        by_unit.setdefault(key[1] if key[0] == "tail" else "head", []).append((grad, n))
    assert set(by_unit) == set(range(len(result.units)))
    for k, calls in by_unit.items():
        assert [n for g, n in calls if g] == [SMALL["batch_size"]] * iters, (k, calls)
        assert [n for g, n in calls if not g] == [SMALL["calib_size"]], (k, calls)  # the bank/FP cache


def _finite_curves(result, name):
    for u in result.units:
        assert name in u.extra, (u.name, u.extra)
        assert u.extra[name] and all(math.isfinite(v) for v in u.extra[name]), (u.name, u.extra)


@pytest.mark.slow
def test_pdquant_end_to_end(resnet18, fmnist64):
    result, log = _run(resnet18, fmnist64, {"method": "pdquant"})
    _finite_curves(result, "pd")
    assert all(set(u.extra) == {"pd"} for u in result.units)
    assert all(math.isfinite(u.loss_after) for u in result.units)
    _check_tail_once_per_iteration(result, log, SMALL["iters"])


def test_the_cl_curve_has_a_point_for_each_report_window_that_had_the_term(resnet18, fmnist64):
    # 6 iterations report every iteration; with every: 4 in pulses only iterations 0 and 4 have the
    # term, so the curve has two points, not four zeros between them
    data = fmnist64[:16]
    result = calibrate(resnet18, data, {**SMALL, "iters": 6, "calib_size": 16, "batch_size": 8, "method": "qdrop",
                                        "cl_calib": {"enabled": True, "every": 4, "hold": False}})
    assert all(len(u.extra["cl"]) == 2 and all(v > 0 for v in u.extra["cl"]) for u in result.units[:-1])


@pytest.mark.slow
def test_qdrop_cl_end_to_end_and_gradients_reach_rounding_and_step_sizes(resnet18, fmnist64):
    grads = {}

    def factory(ctx: UnitContext):
        terms = ut.unit_terms(ctx)
        first = [True]

        def wrapped(out_q, target, idx):
            got = terms(out_q, target, idx)
            if first[0]:  # gradients of the CL term alone, at the first iteration
                first[0] = False
                alphas = [layer.wq.alpha for layer in ctx.unit.layers()]
                scales = [q.scale for q in ctx.unit.act_quantizers() if q.scale.requires_grad]
                g = torch.autograd.grad(got["cl"], alphas + scales, retain_graph=True, allow_unused=True)
                grads[ctx.index] = (g[: len(alphas)], g[len(alphas) :])
            return got

        wrapped.rec_weight = terms.rec_weight  # a unit's terms say what weight its MSE keeps
        return wrapped

    # the every-iteration form: its tail runs once per iteration (the held form's turns: test_held_terms.py)
    result, log = _run(resnet18, fmnist64, {"method": "qdrop", "cl_calib": {"enabled": True, "every": 1}}, factory)
    _finite_curves(result, "cl")
    assert all(set(u.extra) == {"cl"} for u in result.units)
    _check_tail_once_per_iteration(result, log, SMALL["iters"])
    assert set(grads) == set(range(len(result.units)))
    n_scales = 0
    for k, (g_alpha, g_scale) in grads.items():
        for g in g_alpha:
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, result.units[k].name
        for g in g_scale:
            assert g is not None and torch.isfinite(g) and g != 0, result.units[k].name
        n_scales += len(g_scale)
    assert n_scales >= len(result.units) - 1  # every unit but the classifier has a learned step size


# ------------------------------------------------------------------ one unit, without the engine


@pytest.fixture(scope="module")
def small_net():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    x = torch.randn(12, 3, 32, 32)
    qm = QuantModel(model, QuantSpec(4, 4, 8), x)
    for layer in qm.layers():
        layer.wq.init_range(layer.weight, mse=False)
    units = qm.units()
    outs = {}
    hooks = [u.register_forward_hook(lambda _m, _i, o, k=k: outs.__setitem__(k, o)) for k, u in enumerate(units)]
    with torch.no_grad(), observing([q for u in units for q in u.act_quantizers()]):  # ranges from this batch
        qm(x)
    for h in hooks:
        h.remove()
    return qm, outs


def _ctx(qm, outs, k, **cfg):
    # the term's formulas on one call: the every-iteration form unless a test names `every` (the
    # default form's turns are tests/test_held_terms.py's)
    if "cl_calib" in cfg and "every" not in cfg["cl_calib"]:
        cfg["cl_calib"] = {**cfg["cl_calib"], "every": 1}
    cfg = CalibConfig.model_validate({"batch_size": 4, **cfg})
    return UnitContext(qm, k, qm.units()[k], outs[k], cfg, outs[k].device)


def test_terms_match_the_formulas_and_share_one_tail_call(small_net):
    qm, outs = small_net
    k = 3
    cfg = {"method": "pdquant", "cl_calib": {"enabled": True, "lambda": 0.3, "tau": 0.2, "critic": "infonce", "negatives": "bank"}}
    ctx = _ctx(qm, outs, k, **cfg)
    log = []
    with pytest.MonkeyPatch.context() as mp:
        _counting(mp, log)
        terms = ut.unit_terms(ctx)
    idx = torch.tensor([0, 5, 7, 5])
    out_q = (outs[k][idx] + 0.05 * torch.randn_like(outs[k][idx])).requires_grad_(True)
    log.clear()
    got = terms(out_q, outs[k][idx], idx)
    assert [g for _, g, _ in log] == [True]  # the tail ran once, on out_q
    tail = fp_tail(qm, k, "logits")
    with torch.no_grad():
        l_q, l_f, l_all = tail(out_q), tail(outs[k][idx]), tail(outs[k])
    assert got["pd"].item() == pytest.approx(10.0 * pd_loss(l_q, l_f, 4.0).item(), rel=1e-5)
    ref = contrastive_loss(embed(l_q), embed(l_f), tau=0.2, critic="infonce", bank=embed(l_all), bank_index=idx, calib_size=12)
    assert got["cl"].item() == pytest.approx(0.3 * ref.item(), rel=1e-5)
    (got["pd"] + got["cl"]).backward()
    assert out_q.grad is not None and out_q.grad.abs().sum() > 0


def test_default_cl_uses_batch_negatives_and_excludes_repeated_samples(small_net):
    qm, outs = small_net
    k = 3
    terms = ut.unit_terms(_ctx(qm, outs, k, method="qdrop", cl_calib={"enabled": True}))
    idx = torch.tensor([2, 9, 2, 4])
    z_q = outs[k][idx] * 1.2
    got = terms(z_q, outs[k][idx], idx)
    tail = fp_tail(qm, k, "logits")
    with torch.no_grad():
        e_q, e_f = embed(tail(z_q)), embed(tail(outs[k][idx]))
    ref = contrastive_loss(e_q, e_f, tau=0.5, critic="relational", bank_index=idx, calib_size=12)
    assert got["cl"].item() == pytest.approx(10.0 * ref.item(), rel=1e-5)  # the default form: relational, lambda 10


def test_relational_cl_through_the_tail_is_zero_at_the_fp_output(small_net):
    """Issue 17's form through the engine's wiring: lambda * KL of the FP tail's similarity
    profiles, 0 when the unit's output is the FP one, the hand value otherwise."""
    qm, outs = small_net
    k = 3
    cl = {"enabled": True, "critic": "relational", "lambda": 10.0, "tau": 0.5}
    terms = ut.unit_terms(_ctx(qm, outs, k, method="qdrop", cl_calib=cl))
    idx = torch.tensor([2, 9, 2, 4])
    assert terms(outs[k][idx], outs[k][idx], idx)["cl"].item() == pytest.approx(0.0, abs=1e-6)
    z_q = (outs[k][idx] * 1.2 + 0.1).requires_grad_(True)
    got = terms(z_q, outs[k][idx], idx)
    tail = fp_tail(qm, k, "logits")
    with torch.no_grad():
        e_q, e_f = embed(tail(z_q)), embed(tail(outs[k][idx]))
    ref = contrastive_loss(e_q, e_f, tau=0.5, critic="relational", bank_index=idx, calib_size=12)
    assert ref.item() > 0
    assert got["cl"].item() == pytest.approx(10.0 * ref.item(), rel=1e-5)
    got["cl"].backward()
    assert z_q.grad is not None and z_q.grad.abs().sum() > 0


def test_every_kth_iteration_gets_the_cl_term_k_times_as_strong_and_only_then_runs_the_tail(small_net):
    qm, outs = small_net
    k = 3
    idx = torch.tensor([2, 9, 2, 4])
    z_q = outs[k][idx] * 1.2 + 0.1
    full = ut.unit_terms(_ctx(qm, outs, k, method="qdrop", cl_calib={"enabled": True}))
    log = []
    with pytest.MonkeyPatch.context() as mp:
        _counting(mp, log)
        every = ut.unit_terms(_ctx(qm, outs, k, method="qdrop", cl_calib={"enabled": True, "every": 3, "hold": False}))
        got = [every(z_q, outs[k][idx], idx, turn=it % every.every == 0) for it in range(7)]
    assert every.every == 3 and [sorted(g) for g in got] == [["cl"], [], [], ["cl"], [], [], ["cl"]]
    assert sum(1 for _key, grad, _n in log if grad) == 3  # the tail ran on those iterations only
    assert got[0]["cl"].item() == pytest.approx(3 * full(z_q, outs[k][idx], idx)["cl"].item(), rel=1e-6)


def test_a_shorter_tail_embeds_the_pooled_output_a_few_units_on_and_pd_keeps_the_logits(small_net):
    qm, outs = small_net
    k = 3
    idx = torch.tensor([2, 9, 2, 4])
    z_q = (outs[k][idx] * 1.2 + 0.1).requires_grad_(True)
    log = []
    with pytest.MonkeyPatch.context() as mp:
        _counting(mp, log)  # counts the logits/features tails only: the shorter one is not among them
        terms = ut.unit_terms(_ctx(qm, outs, k, method="qdrop", cl_calib={"enabled": True, "tail_units": 2}))
        log.clear()
        got = terms(z_q, outs[k][idx], idx)
    assert log == []  # the whole remainder never runs
    short = fp_tail_units(qm, k, 2)
    with torch.no_grad():
        e_q, e_f = embed(pool(short(z_q))), embed(pool(short(outs[k][idx])))
    ref = contrastive_loss(e_q, e_f, tau=0.5, critic="relational", bank_index=idx, calib_size=12)
    assert ref.item() > 0 and got["cl"].item() == pytest.approx(10.0 * ref.item(), rel=1e-5)
    assert terms(outs[k][idx], outs[k][idx], idx)["cl"].item() == pytest.approx(0.0, abs=1e-6)
    got["cl"].backward()
    assert z_q.grad.abs().sum() > 0
    # with PD: PD's KL on the logits tail as without tail_units, CL on the shorter one
    both = ut.unit_terms(_ctx(qm, outs, k, method="pdquant", cl_calib={"enabled": True, "tail_units": 2}))
    pd_only = ut.unit_terms(_ctx(qm, outs, k, method="pdquant"))
    got = both(z_q.detach(), outs[k][idx], idx)
    assert got["pd"].item() == pytest.approx(pd_only(z_q.detach(), outs[k][idx], idx)["pd"].item(), rel=1e-6)
    assert got["cl"].item() == pytest.approx(10.0 * ref.item(), rel=1e-5)
    assert both.capturable


def test_tail_units_without_the_tail_mapping_is_refused():
    with pytest.raises(ValueError, match="tail_units shortens the fp_tail mapping"):
        CalibConfig.model_validate({"cl_calib": {"enabled": True, "mapping": "pool", "tail_units": 2}})


def test_terms_a_cuda_graph_may_capture_are_those_whose_calls_repeat_the_same_device_work(small_net):
    qm, outs = small_net
    k = 3

    def capturable(**cfg):
        return ut.unit_terms(_ctx(qm, outs, k, **cfg)).capturable

    assert capturable(method="qdrop", cl_calib={"enabled": True})  # the shipped form
    assert capturable(method="pdquant")
    assert capturable(method="pdquant", cl_calib={"enabled": True, "negatives": "bank"})
    # turns and the iterations between them are two graphs
    assert capturable(method="qdrop", cl_calib={"enabled": True, "every": 4})
    assert capturable(method="qdrop", cl_calib={"enabled": True, "every": 4, "hold": True})
    assert not capturable(method="qdrop", cl_calib={"enabled": True, "num_negatives": 2})  # a generator draws them


def test_features_end_runs_the_tail_to_the_features_and_the_head_once(small_net):
    qm, outs = small_net
    k = 4
    ctx = _ctx(qm, outs, k, method="pdquant", cl_calib={"enabled": True, "tail_end": "features", "negatives": "batch"})
    log = []
    with pytest.MonkeyPatch.context() as mp:
        _counting(mp, log)
        terms = ut.unit_terms(ctx)
        log.clear()
        idx = torch.tensor([1, 2, 3, 4])
        got = terms(outs[k][idx] * 1.1, outs[k][idx], idx)
    assert [(key, g) for key, g, _ in log] == [(("tail", k, "features"), True), (("head",), True)]
    with torch.no_grad():
        expect = pd_loss(fp_tail(qm, k)(outs[k][idx] * 1.1), fp_tail(qm, k)(outs[k][idx]), 4.0)
    assert got["pd"].item() == pytest.approx(10.0 * expect.item(), rel=1e-4)
    assert set(got) == {"pd", "cl"}


def test_final_unit_uses_the_logits_whatever_tail_end_says(small_net):
    qm, outs = small_net
    k = len(qm.unit_names) - 1
    for end in ("features", "logits"):
        terms = ut.unit_terms(_ctx(qm, outs, k, method="pdquant", cl_calib={"enabled": True, "tail_end": end}))
        idx = torch.arange(4)
        got = terms(outs[k][idx] + 0.1, outs[k][idx], idx)
        assert set(got) == {"pd", "cl"} and all(torch.isfinite(v) for v in got.values())


def test_pool_mapping_and_pd_regulariser(small_net):
    qm, outs = small_net
    k = 2
    cfg = {"method": "pdquant", "pdquant": {"reg_weight": 0.5}, "cl_calib": {"enabled": True, "mapping": "pool", "critic": "nce", "lambda": 0.1, "tau": 0.5, "negatives": "bank"}}
    terms = ut.unit_terms(_ctx(qm, outs, k, **cfg))
    idx = torch.tensor([0, 1, 2, 3])
    z_q = outs[k][idx] * 0.9
    got = terms(z_q, outs[k][idx], idx)
    assert set(got) == {"pd", "pd_reg", "cl"}
    assert got["pd_reg"].item() == pytest.approx(0.5 * (z_q - outs[k][idx]).pow(2).sum(1).mean().item(), rel=1e-5)
    bank = embed(pool(outs[k]))
    ref = contrastive_loss(embed(pool(z_q)), bank[idx], tau=0.5, critic="nce", bank=bank, bank_index=idx, calib_size=12)
    assert got["cl"].item() == pytest.approx(0.1 * ref.item(), rel=1e-5)


def test_skip_rules_and_the_mse_weight_each_unit_keeps(small_net):
    qm, outs = small_net
    k = 1
    assert ut.unit_terms(_ctx(qm, outs, k, method="qdrop")) is None  # nothing enabled
    assert ut.unit_terms(_ctx(qm, outs, k, method="qdrop", cl_calib={"enabled": True, "lambda": 0.0})) is None
    one = {k: outs[k][:1]}
    assert ut.unit_terms(_ctx(qm, one, k, method="qdrop", cl_calib={"enabled": True})) is None  # M = 1
    ctx = _ctx(qm, outs, k, method="qdrop", batch_size=1, cl_calib={"enabled": True, "negatives": "batch"})
    assert ut.unit_terms(ctx) is None  # no other sample in a batch of one
    terms = ut.unit_terms(_ctx(qm, outs, k, method="pdquant", batch_size=1,
                               cl_calib={"enabled": True, "negatives": "batch", "rec_weight": 0.5}))
    assert set(terms(outs[k][:1], outs[k][:1], torch.tensor([0]))) == {"pd"}
    assert terms.rec_weight == 1.0  # no CL term here, so its MSE stays whole
    with_cl = ut.unit_terms(_ctx(qm, outs, k, method="qdrop", cl_calib={"enabled": True, "rec_weight": 0.5}))
    assert with_cl.rec_weight == 0.5
    terms = ut.unit_terms(_ctx(qm, outs, k, method="pdquant"))
    with pytest.raises(RuntimeError, match="ctx.fp_out"):
        terms(outs[k][:2], outs[k][2:4], torch.tensor([0, 1]))


def test_pdquant_defaults_reproduce_the_reference_recipe():
    """PD-Quant: rec + round + KL / lamb_r, lamb_r = 0.1; T = 4 (ResNet/RegNet), 1 (MobileNet)."""
    cfg = CalibConfig(method="pdquant")
    assert (cfg.pdquant.pd_weight, cfg.pdquant.reg_weight, cfg.pdquant.temperature) == (10.0, 0.0, None)
    x = torch.randn(1, 3, 32, 32)
    resnet = QuantModel(build_model("resnet18", 10), QuantSpec(4, 4, 8), x)
    mobile = QuantModel(build_model("mobilenet_v2", 10), QuantSpec(4, 4, 8), x)
    assert ut.pd_temperature(cfg, resnet) == 4.0
    assert ut.pd_temperature(cfg, mobile) == 1.0
    assert ut.pd_temperature(CalibConfig(method="pdquant", pdquant={"temperature": 2.5}), mobile) == 2.5


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


def test_adaround_gets_the_terms_on_one_layer_units():
    torch.manual_seed(0)
    seen = []

    def factory(ctx):
        seen.append(ctx.index)
        return ut.unit_terms(ctx)

    result = calibrate(_Tiny().eval(), torch.randn(8, 3, 6, 6), {**SMALL, "method": "adaround", "calib_size": 8, "batch_size": 4,
                                                                 "cl_calib": {"enabled": True}}, terms=factory)
    assert seen == [0, 1]
    assert all("cl" in u.extra for u in result.units)
