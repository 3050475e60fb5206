"""The calibration draw (``calib_seed``): which images of a larger supplied set are calibrated on,
recorded in the report; ``seed`` keeps seeding batches and dropping."""

import pytest
import torch

from clcalib import calibrate
from clcalib.config import CalibConfig
from clcalib.data import tensor_sha256
from clcalib.pipeline import run_calibration
from clcalib.testing import PREPROCESS, REFERENCE, calibration_indices, write_zip

WEIGHTS = REFERENCE / "fmnist_resnet18.safetensors"


@pytest.fixture(scope="module")
def calib_zip(tmp_path_factory):
    return write_zip(tmp_path_factory.mktemp("draw") / "calib.zip", "train", calibration_indices(32, seed=0), by_class=False)


def _report(calib_zip, out, **cfg):
    # minmax: no reconstruction, so each run costs the model's conversion and one pass
    config = CalibConfig.model_validate({"method": "minmax", "calib_size": 8, "preprocess": PREPROCESS, **cfg})
    return run_calibration(arch="resnet18", num_classes=10, weights=WEIGHTS, calibration=calib_zip, config=config,
                           out_dir=out)


def test_calib_seed_picks_the_images_and_the_report_says_which(calib_zip, tmp_path):
    a = _report(calib_zip, tmp_path / "a", calib_seed=1, seed=5)
    again = _report(calib_zip, tmp_path / "again", calib_seed=1, seed=0)  # seed does not move the draw
    other = _report(calib_zip, tmp_path / "other", calib_seed=2, seed=5)
    assert a["calib_sha256"] == again["calib_sha256"] != other["calib_sha256"]
    assert a["calib_images"] == other["calib_images"] == 8
    assert a["calib_draw"] == {"seed": 1, "supplied": 32} and other["calib_draw"]["seed"] == 2
    assert a["config"]["calib_seed"] == 1


def test_calib_seed_null_draws_as_seed_did_before(calib_zip, tmp_path):
    by_seed = _report(calib_zip, tmp_path / "null", seed=3)
    named = _report(calib_zip, tmp_path / "named", seed=0, calib_seed=3)
    assert by_seed["config"]["calib_seed"] is None and by_seed["calib_draw"]["seed"] == 3
    assert by_seed["calib_sha256"] == named["calib_sha256"]


def test_calibrate_on_a_tensor_draws_only_when_asked(reference):
    x = torch.randn(12, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    cfg = {"method": "minmax", "calib_size": 4, "device": "cpu"}
    model = reference("resnet18")
    first = calibrate(model, x, cfg, on_progress=lambda e: None)
    assert first.calib_sha256 == tensor_sha256(x[:4])  # no draw named: the first calib_size, as before
    d1 = calibrate(model, x, {**cfg, "calib_seed": 1}, on_progress=lambda e: None)
    d1b = calibrate(model, x, {**cfg, "calib_seed": 1}, on_progress=lambda e: None)
    d2 = calibrate(model, x, {**cfg, "calib_seed": 2}, on_progress=lambda e: None)
    assert d1.calib_sha256 == d1b.calib_sha256 and len({first.calib_sha256, d1.calib_sha256, d2.calib_sha256}) == 3
