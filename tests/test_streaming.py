"""The evaluation set streams (issue 15 item 5): 4000 images preprocessed to 224 px (2.2 GiB
stacked, over a stacking limit set to 1 GiB, which the stacked loader refuses) are evaluated
with a peak RSS that does not grow with the set, and stream to the same logits as the stacked
path. (The default limit is 16 GiB; a set over it takes minutes of CPU to decode, so the test
moves the limit instead.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from clcalib.config import Preprocess
from clcalib.data import LabeledSet, Limits, load_labeled
from clcalib.errors import DataError
from clcalib.metrics import predict
from clcalib.testing import write_zip

N = 4000
LIMIT = 1 << 30
PRE = {"resize": 224, "crop": 224, "mean": [0.286], "std": [0.353]}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(3 * 28 * 28, 10))


def test_a_large_evaluation_set_streams_with_bounded_memory(tmp_path):
    z = write_zip(tmp_path / "eval.zip", "train", range(N), by_class=True)
    with pytest.raises(DataError, match="more than the 1024 MiB allowed"):
        load_labeled(z, Preprocess(**PRE), Limits(max_tensor_bytes=LIMIT))
    script = textwrap.dedent(f"""
        import torch
        from torch import nn
        from clcalib.config import Preprocess
        from clcalib.data import LabeledSet
        from clcalib.metrics import predict
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(3 * 28 * 28, 10))
        from clcalib.data import Limits
        ds = LabeledSet({str(z)!r}, Preprocess(**{PRE!r}), Limits(max_tensor_bytes={LIMIT}))
        logits = predict(model, ds.images(256))
        assert logits.shape == ({N}, 10), logits.shape
        peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        print(peak // 1024)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    peak_mib = int(r.stdout.strip())
    stacked_mib = N * 3 * 224 * 224 * 4 >> 20
    print(f"\nstreamed {N} images at 224 px: peak RSS {peak_mib} MiB (stacked: {stacked_mib} MiB)")
    assert peak_mib < 1536 and peak_mib < stacked_mib / 1.5, peak_mib


def test_streamed_and_stacked_give_the_same_logits(tmp_path):
    z = write_zip(tmp_path / "eval.zip", "t10k", range(300), by_class=True)
    model, pre = _model(), Preprocess(**PRE)
    ds = LabeledSet(z, pre)
    stacked = load_labeled(z, pre)
    assert torch.equal(ds.labels, stacked.labels) and ds.mapping == stacked.mapping
    assert torch.equal(predict(model, ds.images(64)), predict(model, stacked.images))


def test_calibrate_takes_a_dataloader_of_image_label_pairs():
    """clcalib.calibrate(model, DataLoader) uses the first calib_size images, as the tensor would."""
    from torch.utils.data import DataLoader, TensorDataset

    from clcalib import calibrate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    x = torch.randn(96, 3, 16, 16)
    loader = DataLoader(TensorDataset(x, torch.zeros(96, dtype=torch.long)), batch_size=20)
    cfg = {"method": "qdrop", "iters": 3, "calib_size": 64, "device": "cpu"}
    a = calibrate(model, loader, cfg)
    b = calibrate(model, x[:64], cfg)
    assert a.calib_sha256 == b.calib_sha256
    with torch.no_grad():
        assert torch.equal(a.model(x[64:]), b.model(x[64:]))
    with pytest.raises(DataError, match="iterable of such batches"):
        calibrate(model, "images.zip", cfg)


def test_an_exported_run_reads_the_evaluation_set_twice_not_three_times(tmp_path, monkeypatch):
    # once for the FP model before calibrating, once for the quantized model and ONNX Runtime
    # together (a large set costs minutes per decode)
    from clcalib.config import CalibConfig
    from clcalib.pipeline import run_calibration
    from clcalib.testing import PREPROCESS, REFERENCE

    reads = []
    batches = LabeledSet.batches

    def counted(self, size=256, limit=None):
        if limit is None:  # a whole pass (the shape probe reads one image)
            reads.append(1)
        yield from batches(self, size, limit)

    monkeypatch.setattr(LabeledSet, "batches", counted)
    calib = write_zip(tmp_path / "calib.zip", "train", range(32), by_class=False)
    evalset = write_zip(tmp_path / "eval.zip", "t10k", range(300), by_class=True)
    report = run_calibration(arch="resnet18", num_classes=10, weights=REFERENCE / "fmnist_resnet18.safetensors",
                             calibration=calib, evaluation=evalset, out_dir=tmp_path / "out",
                             config=CalibConfig.model_validate({"method": "mse", "calib_size": 32, "export": ["onnx"],
                                                                "preprocess": PREPROCESS}))
    m = report["metrics"]
    assert len(reads) == 2, f"the evaluation set was read {len(reads)} times"
    assert m["eval_images"] == m["onnx_checked_images"] == 300 and m["onnx_top1_agreement"] >= 99.0, m
