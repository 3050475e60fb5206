"""Quantizer math against float64 references."""

import pytest
import torch

from clcalib.quant.primitives import (
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
    search_qparams,
)
from clcalib.quant.weight import GAMMA, ZETA, WeightQuantizer


def ref_quant(x, scale, zero, bits):
    x, scale, zero = x.double(), scale.double(), zero.double()
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quant_matches_float64_reference(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 1000, generator=g) * 3
    s, z = choose_qparams(x.min(1).values[:, None], x.max(1).values[:, None], bits, symmetric)
    out = fake_quantize(x, s, z, bits)
    assert torch.allclose(out.double(), ref_quant(x, s, z, bits), atol=1e-5)
    q = quantize(x, s, z, bits)
    assert q.min() >= 0 and q.max() <= 2**bits - 1 and torch.equal(q, q.round())
    assert torch.equal(dequantize(q, s, z), out)
    # zero is exactly representable (padding and ReLU zeros stay zero)
    assert torch.all(fake_quantize(torch.zeros_like(x), s, z, bits) == 0)
    # error inside the range is at most half a step
    inside = (x >= x.min(1, keepdim=True).values) & (x <= x.max(1, keepdim=True).values)
    assert torch.all(((out - x).abs() <= s / 2 + 1e-6) | ~inside)


def test_symmetric_zero_point_is_mid_grid():
    s, z = choose_qparams(torch.tensor([-1.0]), torch.tensor([3.0]), 4, symmetric=True)
    assert float(z) == 8
    assert float(s) >= 3.0 / 7 - 1e-7 and float(s) >= 1.0 / 8


def test_mse_search_beats_minmax_on_heavy_tails():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))
    s0, z0 = search_qparams(x, 4, mse=False)
    s1, z1 = search_qparams(x, 4, mse=True)
    e0 = (fake_quantize(x, s0, z0, 4) - x).pow(2).mean()
    e1 = (fake_quantize(x, s1, z1, 4) - x).pow(2).mean()
    assert e1 < 0.5 * e0


def test_ste_gradient_reaches_input_and_scale():
    x = torch.linspace(-1, 1, 50, requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    fake_quantize(x, s, torch.tensor(8.0), 4).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert s.grad is not None and torch.isfinite(s.grad)


@pytest.mark.parametrize("beta", [None, 2.0, 17.5])
def test_fused_adaround_matches_eager_formula(beta):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    wq = WeightQuantizer(w.shape, 3)
    wq.init_range(w)
    wq.start_adaround(w)
    # starts at the FP weight where the weight is inside the grid
    inside = (wq._base >= 0) & (wq._base <= 6)
    assert torch.allclose(wq(w)[inside], w[inside], atol=1e-5)
    with torch.no_grad():
        wq.alpha += torch.randn_like(wq.alpha)
    wq.set_regularizer(beta, 0.01)
    out = wq(w)
    ((out**2).sum() + wq.last_reg).backward()
    a = wq.alpha.detach().double().requires_grad_()
    h = torch.clamp(torch.sigmoid(a) * (ZETA - GAMMA) + GAMMA, 0, 1)
    ref = (torch.clamp(wq._floor.double() + h + wq.zero.double(), 0, 7) - wq.zero.double()) * wq.scale.double()
    loss = (ref**2).sum() + (0.01 * (1 - (2 * h - 1).abs().pow(beta)).sum() if beta else 0)
    loss.backward()
    assert torch.allclose(out.double(), ref, atol=1e-6)
    assert abs(float(wq.last_reg.detach()) - (float(loss.detach()) - float((ref**2).sum().detach()))) < 1e-4
    assert torch.allclose(wq.alpha.grad.double(), a.grad, atol=1e-5)


def test_harden_gives_integer_codes_within_one_step_of_the_weight():
    torch.manual_seed(1)
    w = torch.randn(8, 4)
    wq = WeightQuantizer(w.shape, 4)
    wq.init_range(w)
    wq.start_adaround(w)
    wq.harden()
    assert wq.alpha is None and torch.equal(wq.q, wq.q.round())
    assert wq.q.min() >= 0 and wq.q.max() <= 15
    lo = (wq.q.min() - wq.zero) * wq.scale
    err = (wq(w) - w).abs()
    clipped = (w < lo - wq.scale) | (w > (15 - wq.zero) * wq.scale + wq.scale)
    assert torch.all((err <= wq.scale + 1e-6) | clipped)


def test_activation_range_search_minimises_the_configured_norm(fmnist, reference):
    from clcalib import calibrate
    from clcalib.quant.activation import ActQuantizer, RangeSearch

    x = torch.relu(torch.randn(100_000, generator=torch.Generator().manual_seed(0))) ** 1.5
    ranges = {}
    for p in (2.0, 2.4):
        q = ActQuantizer(2, RangeSearch(p=p))
        q.observe(x)
        ranges[p] = float(q.scale.detach()) * 3
    assert ranges[2.4] > 1.05 * ranges[2.0]  # a higher norm punishes clipping more: a wider range
    cfg = {"method": "mse", "w_bits": 4, "a_bits": 2, "iters": 0, "calib_size": 64, "device": "cpu", "act_range_p": 2.0}
    qm = calibrate(reference("resnet18"), fmnist["train"][:64], cfg).model
    assert {q.search.p for q in qm.modules() if isinstance(q, ActQuantizer)} == {2.0}  # not the default 2.4
