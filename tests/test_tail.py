"""The frozen FP remainder of a network after a unit (clcalib.graph.tail)."""

import pytest
import torch
from torch import nn

from clcalib.config import Partition
from clcalib.errors import UnsupportedModel
from clcalib.graph.partition import QuantModel, QuantSpec
from clcalib.graph.registry import build_model
from clcalib.graph.tail import _trace, fp_head, fp_tail, fp_tail_units
from clcalib.quant.activation import ActQuantizer
from clcalib.quant.layer import QuantLayer
from clcalib.quant.switch import observing, quantization


def _quantized(model: nn.Module, x: torch.Tensor) -> QuantModel:
    """A QuantModel with every weight and activation quantizer initialised and switched on."""
    qm = QuantModel(model, QuantSpec(2, 2, 8), x)
    for layer in qm.layers():
        layer.wq.init_range(layer.weight, mse=False)
    acts = [m for m in qm.modules() if isinstance(m, ActQuantizer)]
    with torch.no_grad(), observing(acts):
        qm(x)
    return qm


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def net(request):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(request.param, 10)
    for m in model.modules():  # non-trivial BatchNorm statistics, so folding matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
    qm = _quantized(model, x)
    units = qm.units()
    outs, feats = {}, {}
    hooks = [u.register_forward_hook(lambda _m, _i, o, k=k: outs.__setitem__(k, o)) for k, u in enumerate(units)]
    hooks.append(units[-1].register_forward_pre_hook(lambda _m, args: feats.__setitem__(0, args[0])))
    with torch.no_grad(), quantization(qm, False):
        qm(x)
    for h in hooks:
        h.remove()
    return {"qm": qm, "x": x, "logits": logits, "outs": outs, "features": feats[0]}


def _indices(n):
    return sorted({0, 1, n // 2, n - 2, n - 1})


def test_tail_of_fp_unit_output_gives_fp_logits_while_quantization_is_on(net):
    qm, logits = net["qm"], net["logits"]
    with torch.no_grad():
        assert not torch.allclose(qm(net["x"]), logits, atol=1e-2)  # the model is quantized
    n = len(qm.unit_names)
    for k in _indices(n):
        with torch.no_grad():
            out = fp_tail(qm, k, "logits")(net["outs"][k])
        assert torch.allclose(out, logits, atol=1e-5, rtol=1e-5), (qm.unit_names[k], (out - logits).abs().max())
    # the quantizers are on again afterwards
    assert all(m.active for m in qm.modules() if isinstance(m, (ActQuantizer, QuantLayer)))


def test_features_tail_and_head_compose_to_the_logits_tail(net):
    qm = net["qm"]
    n = len(qm.unit_names)
    with torch.no_grad():
        for k in _indices(n - 1):
            feats = fp_tail(qm, k, "features")(net["outs"][k])
            assert torch.allclose(feats, net["features"], atol=1e-5, rtol=1e-5), qm.unit_names[k]
            assert torch.allclose(fp_head(qm)(feats), net["logits"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="final Linear"):
        fp_tail(qm, n - 1, "features")


def test_a_tail_through_n_units_gives_the_fp_output_there(net):
    qm, outs = net["qm"], net["outs"]
    n = len(qm.unit_names)
    with torch.no_grad():
        for k in _indices(n - 3):
            for units in (1, 2):
                got = fp_tail_units(qm, k, units)(outs[k])  # quantizers are on in qm: the tail runs in FP
                assert torch.allclose(got, outs[k + units], atol=1e-5, rtol=1e-5), (qm.unit_names[k], units)
        # no more than `units` units left, the classifier among them: the logits tail
        assert fp_tail_units(qm, n - 3, 2) is fp_tail(qm, n - 3, "logits")
        assert torch.allclose(fp_tail_units(qm, 1, n)(outs[1]), net["logits"], atol=1e-5, rtol=1e-5)
    assert fp_tail_units(qm, 1, 2) is fp_tail_units(qm, 1, 2)  # built once
    with pytest.raises(ValueError, match="units must be >= 1"):
        fp_tail_units(qm, 1, 0)
    with pytest.raises(IndexError):
        fp_tail_units(qm, n, 1)


def test_final_unit_logits_tail_is_the_identity(net):
    qm = net["qm"]
    z = torch.randn(3, 10)
    assert torch.equal(fp_tail(qm, len(qm.unit_names) - 1, "logits")(z), z)


def test_gradient_reaches_the_input_and_no_parameter(net):
    qm = net["qm"]
    params = list(qm.parameters())
    for p in params:  # even parameters that would train are left alone by the tail
        p.requires_grad_(True)
    try:
        n = len(qm.unit_names)
        for k in (0, n - 2):
            z = net["outs"][k].clone().requires_grad_(True)
            fp_tail(qm, k, "logits")(z).pow(2).sum().backward()
            assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
            assert all(p.grad is None for p in params)
        assert all(p.requires_grad for p in params)  # restored
    finally:
        for p in params:
            p.requires_grad_(False)


def test_trace_and_tails_are_cached(net):
    qm = net["qm"]
    assert _trace(qm) is _trace(qm)
    assert fp_tail(qm, 2, "logits") is fp_tail(qm, 2, "logits")
    assert fp_tail(qm, -1, "logits") is fp_tail(qm, len(qm.unit_names) - 1, "logits")
    with pytest.raises(ValueError, match="end must be one of"):
        fp_tail(qm, 0, "penultimate")  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        fp_tail(qm, len(qm.unit_names))


class _Skip(nn.Module):
    """A residual connection around a unit that no registered block contains."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = self.conv1(x)
        y = self.conv2(y) + y
        return self.fc(y.mean((2, 3)))


def test_a_tail_that_needs_an_earlier_value_is_refused():
    x = torch.randn(2, 3, 8, 8)
    qm = QuantModel(_Skip().eval(), QuantSpec(4, 4, 8), x, Partition.MODULES)  # the graph path makes the skip a unit
    assert qm.unit_names == ["conv1", "conv2", "fc"]
    with torch.no_grad(), quantization(qm, False):
        ref = qm(x)
        assert torch.allclose(fp_tail(qm, 0)(qm.model.conv1(x)), ref, atol=1e-6)
    with pytest.raises(UnsupportedModel, match="conv1.*computed before the unit.*use partition 'graph'"):
        fp_tail(qm, 1)


class _LongSkip(nn.Module):
    """conv1's output skips over conv2 and conv3 into the input of conv4."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.conv4 = (nn.Conv2d(c, 4, 3, padding=1) for c in (3, 4, 4, 4))
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        a = self.conv1(x)
        c = self.conv3(self.conv2(a)) + a
        return self.fc(self.conv4(c).mean((2, 3)))


def test_a_shorter_tail_across_a_skip_is_refused_and_one_beside_it_is_not():
    x = torch.randn(2, 3, 8, 8)
    qm = QuantModel(_LongSkip().eval(), QuantSpec(4, 4, 8), x, Partition.MODULES)
    assert qm.unit_names == ["conv1", "conv2", "conv3", "conv4", "fc"]
    with torch.no_grad(), quantization(qm, False):
        b = qm.model.conv2(qm.model.conv1(x))
        assert torch.allclose(fp_tail_units(qm, 1, 1)(b), qm.model.conv3(b), atol=1e-6)  # conv2 -> conv3: no skip inside
    with pytest.raises(UnsupportedModel, match="conv1.*computed before the unit.*use partition 'graph'"):
        fp_tail_units(qm, 1, 2)  # conv2 -> conv4 needs conv1's output too
    # what the message advises: the graph path puts the skip inside a unit, and every shorter tail exists
    qg = QuantModel(_LongSkip().eval(), QuantSpec(4, 4, 8), x, Partition.GRAPH)
    for k in range(len(qg.unit_names) - 1):
        assert fp_tail_units(qg, k, 1) is not None


def test_pdquant_on_a_model_without_a_unit_tail_is_an_error_of_the_tree_saying_what_to_change():
    """Reachable through the library API only: the CLI and the worker take registry architectures
    (whose tails exist) or programs, which partition=modules refuses and partition=graph splits
    with such skips inside a unit."""
    import clcalib

    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    config = {"method": "pdquant", "partition": "modules", "iters": 2, "calib_size": 16, "batch_size": 8, "device": "cpu"}
    with pytest.raises(clcalib.CalibrationError, match="not a function of the unit's output alone.*use partition 'graph'"):
        clcalib.calibrate(_Skip().eval(), x, config)
    config["partition"] = "graph"  # what the message advises: the skip is inside a unit
    assert clcalib.calibrate(_Skip().eval(), x, config).model is not None
