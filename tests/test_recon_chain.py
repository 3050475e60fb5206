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


class _Skip(nn.Module):
    """u2 takes u1's output plus u0's: a skip over a unit."""

    def __init__(self, u):
        super().__init__()
        self.u = nn.ModuleList(u)

    def forward(self, x):
        a = self.u[0](x)
        return self.u[2](self.u[1](a) + a)


def test_a_unit_is_fed_from_the_one_before_it_only_where_nothing_else_enters():
    u = [_unit() for _ in range(4)]
    relu_between = nn.Sequential(u[0], nn.ReLU(), u[1], u[2], nn.AdaptiveAvgPool2d(2), u[3])
    chain = probe(relu_between, u, torch.randn(2, 3, 4, 4))
    assert chain.feeds == ["prefix", "gap", "direct", "gap"]
    assert chain.in_numel == [48, 48, 48, 12] and chain.out_numel == [48, 48, 48, 12]

    u = [_unit() for _ in range(3)]
    quantizer_between = nn.Sequential(u[0], ActQuantizer(8), u[1], nn.ReLU(), u[2])
    assert probe(quantizer_between, u, torch.randn(2, 3, 4, 4)).feeds == ["prefix", "prefix", "prefix"]

    u = [_unit() for _ in range(3)]
    assert probe(_Skip(u), u, torch.randn(2, 3, 4, 4)).feeds == ["prefix", "direct", "prefix"]


def test_a_unit_called_twice_gets_no_chain():
    u = [_unit() for _ in range(2)]
    model = nn.Sequential(u[0], u[1], u[0])
    assert probe(model, u, torch.randn(1, 3, 4, 4)) is None


@pytest.mark.parametrize("arch,method", [("mobilenet_v2", "minmax"), ("resnet18", "qdrop")])
def test_chained_calibration_equals_the_prefix_one_to_the_bit(arch, method, fmnist, reference, monkeypatch):
    _chained_equals_prefix(arch, method, "cpu", fmnist, reference, monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by bench/gpu_speed.sh)")
@pytest.mark.parametrize("arch,method", [("mobilenet_v2", "qdrop"), ("resnet18", "qdrop")])
def test_chained_calibration_on_cuda_equals_the_prefix_one_to_the_bit(arch, method, fmnist, reference, monkeypatch):
    # the carry's placement (device or host memory, from the free device memory) only matters here
    _chained_equals_prefix(arch, method, "cuda", fmnist, reference, monkeypatch)


def _chained_equals_prefix(arch, method, device, fmnist, reference, monkeypatch):
    cfg = {"method": method, "w_bits": 4, "a_bits": 4, "iters": 3 if method == "qdrop" else 0, "batch_size": 16,
           "calib_size": 256, "device": device, "seed": 1}
    prefix_runs = []
    capture = engine.capture
    monkeypatch.setattr(engine, "capture", lambda m, target, *a, **k: prefix_runs.append(target) or capture(m, target, *a, **k))
    # the network's prefix runs (quantized and FP) for the first unit only: every later unit is
    # fed by the unit before it, directly or through the pooling/flatten between them
    chained = calibrate(reference(arch), fmnist["train"], cfg)
    names = chained.model.unit_names
    assert [names[chained.model.units().index(t)] for t in prefix_runs] == [names[0], names[0]]

    monkeypatch.setattr(engine, "probe", lambda *a, **k: None)
    plain = calibrate(reference(arch), fmnist["train"], cfg)
    a, b = chained.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [(u.loss_before, u.loss_after) for u in chained.units] == [(u.loss_before, u.loss_after) for u in plain.units]


class _Halve(nn.Module):
    def forward(self, x):
        return x.mul_(0.5)


def test_an_in_place_op_after_a_unit_makes_a_gap_not_a_direct_feed():
    # the unit before returned this very tensor, but an in-place op has changed it since
    u = [_unit() for _ in range(3)]
    model = nn.Sequential(u[0], nn.ReLU(inplace=True), u[1], _Halve(), u[2])
    assert probe(model, u, torch.randn(2, 3, 4, 4)).feeds == ["prefix", "gap", "gap"]


def test_a_unit_that_writes_into_its_input_gets_no_chain():
    u = [_unit(), QuantUnit(nn.Sequential(_Halve(), nn.Conv2d(3, 3, 1)), out_bits=None), _unit()]
    assert probe(nn.Sequential(*u), u, torch.randn(2, 3, 4, 4)) is None


class _SharedInPlaceReLU(nn.Module):
    """One nn.ReLU(inplace=True) registered after both convs: conv2 fuses it, conv1's output
    goes through it in place, between two units (partition=modules)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


def test_an_in_place_activation_between_units_gives_the_prefix_result(monkeypatch):
    torch.manual_seed(0)
    data = torch.randn(64, 3, 8, 8)
    cfg = {"method": "minmax", "w_bits": 4, "a_bits": 4, "iters": 0, "calib_size": 64, "device": "cpu",
           "partition": "modules"}

    def model():
        torch.manual_seed(1)
        return _SharedInPlaceReLU().eval()

    chained = calibrate(model(), data, cfg, on_progress=lambda e: None)
    monkeypatch.setattr(engine, "probe", lambda *a, **k: None)
    plain = calibrate(model(), data, cfg, on_progress=lambda e: None)
    a, b = chained.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
