"""Every registered arch: each Conv2d/Linear quantized exactly once, FP mode equals the original,
and all-8-bit quantization keeps the reference models' accuracy."""

import pytest
import torch
from torch import nn

from clcalib.calibration import calibrate
from clcalib.graph.partition import QuantModel, QuantSpec
from clcalib.graph.registry import ARCHS, build_model
from clcalib.metrics import predict, top1
from clcalib.quant.layer import QuantLayer, QuantUnit
from clcalib.quant.switch import quantization


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_conv_and_linear_quantized_exactly_once(arch):
    torch.manual_seed(0)
    fp = build_model(arch, 10)
    originals = [m for m in fp.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    qm = QuantModel(fp, QuantSpec(4, 4, 8), torch.randn(1, 3, 32, 32))
    layers = qm.layers()
    assert len(layers) == len(originals)
    assert [tuple(q.weight.shape) for q in layers] == [tuple(m.weight.shape) for m in originals]
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in qm.modules())  # none left unquantized
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qm.modules())  # all folded
    # every layer belongs to exactly one reconstruction unit
    owner = {}
    for name, unit in zip(qm.unit_names, qm.units(), strict=True):
        assert isinstance(unit, QuantUnit)
        for layer in unit.layers():
            assert id(layer) not in owner, f"{name} shares a layer with {owner[id(layer)]}"
            owner[id(layer)] = name
    assert len(owner) == len(layers)
    # first conv and last linear at 8 bits; logits not quantized
    units = qm.units()
    assert units[0].layers()[0].wq.bits == 8 and units[-1].layers()[0].wq.bits == 8
    assert units[-1].output_quantizer() is None and units[-2].output_quantizer().bits == 8
    assert all(q.wq.bits == 4 for q in layers[1:-1])
    # with quantization off the converted model is the original (BN folding is exact up to rounding)
    x = torch.randn(2, 3, 32, 32)
    with quantization(qm, False), torch.no_grad():
        assert torch.allclose(qm(x), fp(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_all_8_bit_keeps_fp_accuracy_on_fashion_mnist(arch, fmnist, reference):
    model = reference(arch)
    x, y = fmnist["test"][::4], fmnist["test_labels"][::4]  # every fourth test image: 2500
    fp_acc = top1(predict(model, x), y)
    res = calibrate(model, fmnist["train"][:256], {"method": "mse", "w_bits": 8, "a_bits": 8, "iters": 0, "device": "cpu"})
    q_acc = top1(predict(res.model, x), y)
    # the reference checkpoints as documented (90.50 / 90.02 on all 10k; 90.68 / 90.64 here, W8A8 90.84 / 90.36)
    assert fp_acc > 89.5
    assert abs(q_acc - fp_acc) <= 0.5, f"{arch}: FP {fp_acc:.2f} vs W8A8 {q_acc:.2f}"
    assert all(isinstance(m, QuantLayer) for m in res.model.layers())


@pytest.mark.parametrize("arch, extra", [("resnet18", 11), ("resnet50", 20), ("mobilenet_v2", 10), ("mnasnet1_0", 10),
                                         ("regnet_x_400mf", 26)])
def test_every_layer_placement_quantizes_exactly_the_residual_branch_ends(arch, extra):
    """act_placement every_layer: one more quantizer per conv that feeds a residual add (the
    last conv of each residual block, each downsample/projection); none twice in a row."""
    from clcalib.quant.activation import ActQuantizer

    fp = build_model(arch, 10)
    counts = [sum(isinstance(m, ActQuantizer) for m in QuantModel(fp, QuantSpec(4, 4, 8, every_layer=e),
                                                                  torch.zeros(1, 3, 32, 32)).modules())
              for e in (False, True)]
    assert counts[1] - counts[0] == extra, counts
    qm = QuantModel(fp, QuantSpec(4, 4, 8, every_layer=True), torch.zeros(1, 3, 32, 32))
    no_residual = [u for u in qm.units() if not getattr(u.body, "use_res_connect", getattr(u.body, "apply_residual", True))]
    assert (len(no_residual) > 0) == (arch in ("mobilenet_v2", "mnasnet1_0"))
    for unit in no_residual:  # the unit's own output quantizer follows its last conv: not a second one
        assert unit.out_quant is not None and unit.layers()[-1].out_quant is None, unit


def test_an_activation_quantizer_without_a_range_refuses_to_run():
    """Before calibration the converted model runs only as FP; quantized, it raises instead of
    silently passing activations through unquantized."""
    qm = QuantModel(build_model("resnet18", 10), QuantSpec(4, 4, 8), torch.zeros(1, 3, 32, 32))
    with quantization(qm, False):
        assert qm(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(RuntimeError, match="used before its range was set"):
        qm(torch.zeros(2, 3, 32, 32))
