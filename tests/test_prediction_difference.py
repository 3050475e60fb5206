import math

import pytest
import torch

from clcalib.recon.terms.prediction_difference import pd_loss, pd_regularizer


def _ref_kl(logits_q, logits_f, t):
    """Float64 KL(softmax(f/T) || softmax(q/T)), summed over classes, mean over the batch."""
    total = 0.0
    for q_row, f_row in zip(logits_q.tolist(), logits_f.tolist(), strict=True):
        zq = sum(math.exp(v / t) for v in q_row)
        zf = sum(math.exp(v / t) for v in f_row)
        for q, f in zip(q_row, f_row, strict=True):
            p_f, p_q = math.exp(f / t) / zf, math.exp(q / t) / zq
            total += p_f * math.log(p_f / p_q)
    return total / len(logits_q)


def test_pd_loss_zero_when_equal():
    logits = torch.randn(5, 10)
    assert pd_loss(logits, logits.clone(), 4.0).abs().item() < 1e-6
    # a constant shift of the logits does not change the prediction
    assert pd_loss(logits + 3.0, logits, 1.0).abs().item() < 1e-6


@pytest.mark.parametrize("t", [1.0, 4.0, 0.5])
def test_pd_loss_matches_float64_reference_and_is_positive(t):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 7, generator=g, dtype=torch.float64)
    f = torch.randn(4, 7, generator=g, dtype=torch.float64)
    got = pd_loss(q, f, t)
    assert got.dim() == 0 and got.item() > 0
    assert got.item() == pytest.approx(_ref_kl(q, f, t), rel=1e-10)
    # the direction matters: KL(p_f || p_q), not KL(p_q || p_f)
    assert got.item() != pytest.approx(_ref_kl(f, q, t), rel=1e-6)


def test_pd_loss_hand_computed_two_classes():
    # one sample, two classes, T = 2: p_f = softmax([0, 2]/2), p_q = softmax([0, 0]) = [.5, .5]
    p_f1 = math.exp(1) / (1 + math.exp(1))
    p_f0 = 1 - p_f1
    expected = p_f0 * math.log(p_f0 / 0.5) + p_f1 * math.log(p_f1 / 0.5)
    got = pd_loss(
        torch.tensor([[0.0, 0.0]], dtype=torch.float64),
        torch.tensor([[0.0, 2.0]], dtype=torch.float64),
        2.0,
    )
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_pd_loss_gradient_reaches_quantized_side():
    q = torch.randn(3, 5, requires_grad=True)
    f = torch.randn(3, 5)
    pd_loss(q, f, 4.0).backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_pd_regularizer_matches_formula():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    f = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    expected = sum(
        (a - b) ** 2 for a, b in zip(q.flatten().tolist(), f.flatten().tolist(), strict=True)
    ) / (2 * 16)
    assert pd_regularizer(q, f).item() == pytest.approx(expected, rel=1e-12)
    assert pd_regularizer(q, q).item() == 0.0
    assert pd_regularizer(q, f, p=1.0).item() == pytest.approx(
        (q - f).abs().sum().item() / 32, rel=1e-12
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        pd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="same shape"):
        pd_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        pd_regularizer(torch.zeros(2, 3), torch.zeros(3, 3))
