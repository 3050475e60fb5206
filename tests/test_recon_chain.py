"""Units fed from the unit before them instead of the network's prefix (clcalib.recon.chain):
the same result to the bit, and the prefix runs only where the chain breaks."""

import pytest
import torch
from torch import nn

import clcalib.recon.engine as engine
from clcalib import calibrate
from clcalib.quant.activation import ActQuantizer
from clcalib.quant.layer import QuantUnit
from clcalib.recon.chain import probe


def _unit() -> QuantUnit:
    return QuantUnit(nn.Conv2d(3, 3, 1), out_bits=None)


def test_a_quantizer_or_an_op_between_units_breaks_the_chain():
    u = [_unit() for _ in range(4)]
    model = nn.Sequential(u[0], ActQuantizer(8), u[1], u[2], nn.ReLU(), u[3])
    chain = probe(model, u, torch.randn(1, 3, 4, 4))
    assert chain.follows == [False, False, True, False]
    assert chain.in_numel == chain.out_numel == [48] * 4


def test_a_unit_called_twice_gets_no_chain():
    u = [_unit() for _ in range(2)]
    model = nn.Sequential(u[0], u[1], u[0])
    assert probe(model, u, torch.randn(1, 3, 4, 4)) is None


@pytest.mark.parametrize("arch,method", [("mobilenet_v2", "minmax"), ("resnet18", "qdrop")])
def test_chained_calibration_equals_the_prefix_one_to_the_bit(arch, method, fmnist, reference, monkeypatch):
    cfg = {"method": method, "w_bits": 4, "a_bits": 4, "iters": 3 if method == "qdrop" else 0, "batch_size": 16,
           "calib_size": 256, "device": "cpu", "seed": 1}
    prefix_runs = []
    capture = engine.capture
    monkeypatch.setattr(engine, "capture", lambda m, target, *a, **k: prefix_runs.append(target) or capture(m, target, *a, **k))
    chained = calibrate(reference(arch), fmnist["train"], cfg)
    names = chained.model.unit_names
    # quantized and FP inputs from the prefix only at the first unit and where an op sits between units
    expected = {"mobilenet_v2": ["features.0.0", "classifier.1"], "resnet18": ["conv1", "layer1.0", "fc"]}[arch]
    assert [names[chained.model.units().index(t)] for t in prefix_runs[::2]] == expected

    monkeypatch.setattr(engine, "probe", lambda *a, **k: None)
    plain = calibrate(reference(arch), fmnist["train"], cfg)
    a, b = chained.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [(u.loss_before, u.loss_after) for u in chained.units] == [(u.loss_before, u.loss_after) for u in plain.units]
