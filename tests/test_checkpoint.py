"""The quantized checkpoint: bit packing, exact round trip, header, determinism and resume."""


import pytest
import torch
from safetensors import safe_open

from clcalib import Canceled, ExportError, calibrate, load_quantized
from clcalib.export import pack_bits, read_header, save_quantized, unpack_bits

TINY = {"method": "qdrop", "w_bits": 2, "a_bits": 4, "iters": 4, "batch_size": 16, "calib_size": 64,
        "device": "cpu", "seed": 3}


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_roundtrip(bits):
    q = torch.randint(0, 2**bits, (7, 5, 3)).float()
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-q.numel() * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, q.numel()).reshape(q.shape), q)


@pytest.fixture(scope="module")
def calibrated(fmnist, reference):
    return calibrate(reference("resnet18"), fmnist["train"][:64], TINY)


def test_reloaded_checkpoint_is_bit_identical(calibrated, fmnist, tmp_path):
    path = tmp_path / "q.safetensors"
    storage = save_quantized(calibrated.model, path, arch="resnet18", num_classes=10, config=calibrated.config,
                             input_shape=(1, 3, 28, 28), extra={"metrics": {"x": 1}})
    model = load_quantized(path)
    x = fmnist["test"][:200]
    with torch.no_grad():
        diff = (model(x) - calibrated.model(x)).abs().max()
    assert float(diff) == 0.0
    # 2-bit body, 8-bit first/last: far smaller than FP32
    assert storage.ratio > 10
    h = read_header(path)
    for key in ("arch", "num_classes", "preprocess", "layers", "method", "config", "seed", "versions", "metrics"):
        assert key in h
    assert h["layers"]["model.layer1.0.body.conv1"][0] == 2 and h["layers"]["model.fc.body"][0] == 8
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("model.layer1.0.body.conv1.qweight").dtype == torch.uint8
        assert not any(k.endswith(".weight") for k in f.keys())  # no float weights travel


def test_same_seed_same_result_and_resume_equals_uninterrupted(calibrated, fmnist, reference, tmp_path):
    data = fmnist["train"][:64]
    x = fmnist["test"][:100]

    def stop_at_unit_4(e):
        if e.stage == "prepare" and e.unit == 4:
            raise Canceled("test")

    with pytest.raises(Canceled):
        calibrate(reference("resnet18"), data, TINY, stop_at_unit_4, resume_dir=tmp_path)
    resumed = calibrate(reference("resnet18"), data, TINY, resume_dir=tmp_path)
    assert resumed.metrics["resumed_units"] == 4
    with torch.no_grad():
        assert torch.equal(resumed.model(x), calibrated.model(x))
    # a different config does not pick up the saved units
    other = calibrate(reference("resnet18"), data, {**TINY, "seed": 4, "iters": 1}, resume_dir=tmp_path)
    assert other.metrics["resumed_units"] == 0


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"garbage")
    with pytest.raises(ExportError, match="not a readable safetensors"):
        load_quantized(p)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(p))
    with pytest.raises(ExportError, match="without a clcalib header"):
        load_quantized(p)


def test_resume_ignores_the_export_choice_but_not_the_clcalib_version(fmnist, reference, tmp_path, monkeypatch):
    import clcalib

    data = fmnist["train"][:64]

    def stop_at_unit_2(e):
        if e.stage == "prepare" and e.unit == 2:
            raise Canceled("test")

    for d in ("a", "b"):
        with pytest.raises(Canceled):
            calibrate(reference("resnet18"), data, TINY, stop_at_unit_2, resume_dir=tmp_path / d)
    # asking for an ONNX file as well does not change what is calibrated: the units are reused
    assert calibrate(reference("resnet18"), data, {**TINY, "export": ["onnx"]},
                     resume_dir=tmp_path / "a").metrics["resumed_units"] == 2
    # an upgraded clcalib calibrates afresh instead of trusting units an older one made
    monkeypatch.setattr(clcalib, "__version__", "99.0.0")
    assert calibrate(reference("resnet18"), data, TINY, resume_dir=tmp_path / "b").metrics["resumed_units"] == 0
