"""CL's linearized tail: each sample's Jacobian is the tail's own, the expansion is exact at the FP
output and close near it, and the term built on it never runs the tail per iteration."""

import pytest
import torch

import clcalib.recon.terms.linear_tail as lt
import clcalib.recon.terms.unit as ut
from clcalib.config import CalibConfig
from clcalib.errors import ConfigError
from clcalib.graph.tail import fp_tail
from clcalib.recon.terms.contrastive import contrastive_loss, embed
from tests.test_terms import _counting, _ctx, small_net  # noqa: F401  (a fixture)

K = 3


def test_each_samples_jacobian_is_the_tails_own_across_chunks(small_net):  # noqa: F811
    qm, outs = small_net
    tail = fp_tail(qm, K)
    z = outs[K].detach()
    y, jac = lt.per_sample_jacobian(tail, z, chunk=5, device=z.device)  # 12 samples: chunks of 5, 5, 2
    assert jac.shape == (12, 10, z[0].numel())
    with torch.no_grad():
        assert torch.allclose(y, tail(z), atol=1e-5)
    for i in (0, 6, 11):
        ref = torch.autograd.functional.jacobian(lambda x: tail(x.unsqueeze(0))[0], z[i])
        assert torch.allclose(jac[i], ref.flatten(1), atol=1e-5, rtol=1e-4)


def test_the_expansion_is_exact_at_the_fp_output_and_close_near_it(small_net):  # noqa: F811
    qm, outs = small_net
    tail = fp_tail(qm, K)
    z = outs[K].detach()
    lin = lt.LinearTail(tail, z, chunk=256, device=z.device)
    idx = torch.tensor([3, 0, 3, 7])
    assert torch.equal(lin(z[idx], z[idx], idx), lin.fp_y[idx])
    torch.manual_seed(1)
    step = 1e-3 * z[idx].abs().mean() * torch.randn_like(z[idx])
    with torch.no_grad():
        true = tail(z[idx] + step)
        moved = (true - lin.fp_y[idx]).norm()
        assert (lin(z[idx] + step, z[idx], idx) - true).norm() < 0.05 * moved  # first order captures the move


def test_a_linearized_term_runs_no_tail_per_iteration_and_matches_the_hand_computation(small_net):  # noqa: F811
    qm, outs = small_net
    idx = torch.tensor([2, 9, 2, 4])
    z_f = outs[K][idx]
    z_q = (z_f * 1.05 + 0.01).requires_grad_(True)
    log = []
    with pytest.MonkeyPatch.context() as mp:
        _counting(mp, log)
        terms = ut.unit_terms(_ctx(qm, outs, K, method="qdrop", cl_calib={"enabled": True, "linearize": True}))
        log.clear()
        got = terms(z_q, z_f, idx)
    assert log == []  # the tail is not run per iteration
    tail = fp_tail(qm, K)
    _, jac = lt.per_sample_jacobian(tail, outs[K].detach(), 256, z_f.device)
    with torch.no_grad():
        y_q = tail(z_f) + torch.einsum("npd,nd->np", jac[idx], (z_q - z_f).flatten(1))
        ref = contrastive_loss(embed(y_q), embed(tail(z_f)), tau=0.5, critic="relational", bank_index=idx, calib_size=12)
    assert ref.item() > 0 and got["cl"].item() == pytest.approx(10.0 * ref.item(), rel=1e-4)
    assert terms(z_f, z_f, idx)["cl"].item() == pytest.approx(0.0, abs=1e-6)
    got["cl"].backward()
    assert z_q.grad.abs().sum() > 0
    assert terms.capturable
    # with PD: PD's KL on the exact tail, as without linearize
    both = ut.unit_terms(_ctx(qm, outs, K, method="pdquant", cl_calib={"enabled": True, "linearize": True}))
    pd_only = ut.unit_terms(_ctx(qm, outs, K, method="pdquant"))
    assert both(z_q.detach(), z_f, idx)["pd"].item() == pytest.approx(pd_only(z_q.detach(), z_f, idx)["pd"].item(), rel=1e-6)


def test_jacobians_above_the_limit_are_refused_with_the_figure(small_net, monkeypatch):  # noqa: F811
    qm, outs = small_net
    monkeypatch.setattr(lt, "MAX_JACOBIAN_BYTES", 1000)
    with pytest.raises(ConfigError, match=r"cl_calib.linearize needs .* GiB of Jacobians .*12 images x 10 tail outputs"):
        ut.unit_terms(_ctx(qm, outs, K, method="qdrop", cl_calib={"enabled": True, "linearize": True}))


@pytest.mark.parametrize("other", [{"mapping": "pool"}, {"tail_units": 2}, {"tail_end": "features"}])
def test_linearize_needs_the_logits_tail(other):
    with pytest.raises(ValueError, match="linearize expands the fp_tail mapping to the logits"):
        CalibConfig.model_validate({"cl_calib": {"enabled": True, "linearize": True, **other}})
