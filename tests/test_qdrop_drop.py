"""QDrop's dropping: at the unit input only, or at every activation quantizer of the unit
(drop_scope "all", what the official QDrop code does); never left on after reconstruction."""

import pytest
import torch

from clcalib import calibrate
from clcalib.quant.activation import ActQuantizer
from clcalib.quant.switch import dropping

TINY = {"method": "qdrop", "w_bits": 4, "a_bits": 2, "iters": 6, "batch_size": 16, "calib_size": 64,
        "device": "cpu", "seed": 5}


def test_dropping_keeps_each_element_fp_with_the_given_probability_then_undoes_itself():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0)) * 2
    q = ActQuantizer(2)
    q.observe(x)
    quantized = q(x).detach()
    moved = quantized != x  # elements where dropping makes a visible difference
    with dropping([q], 0.3, torch.Generator().manual_seed(1)):
        out = q(x)
        out.sum().backward()
    kept_fp = (out == x) & moved
    assert torch.all((out == x) | (out == quantized))  # each element is one or the other, nothing between
    assert abs(kept_fp.sum().item() / moved.sum().item() - 0.3) < 0.01
    assert q.scale.grad is not None and q.scale.grad.abs() > 0  # LSQ still learns from the quantized elements
    assert torch.equal(q(x), quantized) and q.drop is None


@pytest.fixture(scope="module")
def both_scopes(fmnist, reference):
    data = fmnist["train"][:64]
    return {scope: calibrate(reference("resnet18"), data, {**TINY, "drop_scope": scope}) for scope in ("input", "all")}


def test_drop_scope_all_changes_reconstruction_and_leaves_no_randomness_behind(both_scopes, fmnist, reference):
    x = fmnist["test"][:100]
    with torch.no_grad():
        out_in = both_scopes["input"].model(x)
        out_all = both_scopes["all"].model(x)
        again = both_scopes["all"].model(x)
    assert not torch.equal(out_in, out_all)  # the inner quantizers were dropped during reconstruction
    assert torch.equal(out_all, again)  # and are not any more: inference is deterministic
    assert all(q.drop is None for q in both_scopes["all"].model.modules() if isinstance(q, ActQuantizer))
    # same seed, same result
    rerun = calibrate(reference("resnet18"), fmnist["train"][:64], {**TINY, "drop_scope": "all"})
    with torch.no_grad():
        assert torch.equal(rerun.model(x), out_all)
    assert both_scopes["all"].config.drop_scope == "all"
