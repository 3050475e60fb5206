"""Silent traps are loud (issue 15): the reference 28 px model calibrated with the ImageNet
default preprocessing, and evaluation folders named by class name, both on real Fashion-MNIST
through the CLI. Also: every calibrate flag says its default, and --version."""

from __future__ import annotations

import json
import re
import subprocess
import zipfile

import pytest
from test_cli import FMNIST_PRE, WEIGHTS, clcalib

from clcalib.testing import calibration_indices, write_zip

# Fashion-MNIST's classes in the model's index order; sorted, they come in another order
CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle-boot"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("traps")
    calib = write_zip(d / "calib.zip", "train", calibration_indices(64, seed=0), by_class=False)
    digits = write_zip(d / "eval.zip", "t10k", range(300), by_class=True)
    few = write_zip(d / "few.zip", "t10k", range(100), by_class=True)  # evaluated at 112 px below
    named = d / "named.zip"
    with zipfile.ZipFile(digits) as src, zipfile.ZipFile(named, "w") as dst:
        for info in src.infolist():
            parts = info.filename.split("/")
            i = next(k for k, p in enumerate(parts) if p.isdigit())
            parts[i] = CLASSES[int(parts[i])]
            dst.writestr("/".join(parts), src.read(info))
    labels = d / "labels.txt"
    labels.write_text("\n".join(CLASSES) + "\n")
    ckpt = d / "ckpt"
    r = clcalib("calibrate", "--arch", "resnet18", "--num-classes", "10", "--weights", WEIGHTS, "--calib", calib,
                "--out", ckpt, "--method", "minmax", "--quiet", *FMNIST_PRE)
    assert r.returncode == 0, r.stderr
    return {"calib": calib, "digits": digits, "few": few, "named": named, "labels": labels,
            "ckpt": ckpt / "quantized.safetensors", "dir": d}


def test_imagenet_preprocessing_on_a_28px_model_warns_before_calibrating(data, tmp_path):
    out = tmp_path / "out"
    # the ImageNet recipe's resize, at 112 instead of 256 (same trap, a quarter of the compute)
    r = clcalib("calibrate", "--arch", "resnet18", "--num-classes", "10", "--weights", WEIGHTS, "--calib",
                data["calib"], "--eval", data["few"], "--out", out, "--method", "minmax", "--quiet",
                "--resize", "112", "--crop", "112", "--calib-size", "16")
    assert r.returncode == 0, r.stderr
    assert "WARNING: preprocess.resize=112 enlarges the images 4.0x" in r.stderr, r.stderr
    assert "--resize none --crop none" in r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["fp_top1"] < 15  # the trap: the FP model itself is near chance
    assert "near chance (10.0 %)" in r.stderr
    assert len(report["metrics"]["warnings"]) == 2  # kept in the report too
    # with the right flags: no warning
    r = clcalib("calibrate", "--arch", "resnet18", "--num-classes", "10", "--weights", WEIGHTS, "--calib",
                data["calib"], "--eval", data["few"], "--out", tmp_path / "ok", "--method", "minmax", "--quiet",
                "--calib-size", "16", *FMNIST_PRE)
    assert r.returncode == 0 and "WARNING" not in r.stderr, r.stderr


def test_class_name_folders_warn_without_labels_and_are_right_with_them(data):
    def top1(*extra):
        r = clcalib("evaluate", "--checkpoint", data["ckpt"], "--json", *extra)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["quant_top1"], r.stderr

    by_index, err = top1("--eval", data["digits"])
    assert by_index > 80 and "WARNING" not in err
    sorted_names, err = top1("--eval", data["named"])
    assert "WARNING: evaluation folders are class names, mapped to class indices in sorted order" in err
    assert "Ankle-boot=0" in err and "--labels" in err
    assert sorted_names < 50  # what a user got silently before
    with_labels, err = top1("--eval", data["named"], "--labels", data["labels"])
    assert with_labels == by_index and "WARNING" not in err
    bad = data["dir"] / "bad_labels.txt"
    bad.write_text("\n".join(c.lower() for c in CLASSES))
    r = clcalib("evaluate", "--checkpoint", data["ckpt"], "--eval", data["named"], "--labels", bad)
    assert r.returncode == 2 and "not in the labels file" in r.stderr and "Traceback" not in r.stderr


def test_every_calibrate_flag_explains_itself():
    r = clcalib("calibrate", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for phrase in ("--iters ITERS optimization iterations per reconstruction unit; range 0..200000; default: 20000",
                   "--method {minmax,mse,adaround,brecq,qdrop,pdquant}", "default: qdrop",
                   "--resize RESIZE shorter side resized to this", "'none' for null; default: 256",
                   "resnet18, resnet34", "--labels"):
        assert phrase in text, phrase
    v = clcalib("--version")
    assert v.returncode == 0 and v.stdout.startswith("clcalib ")


def test_the_report_names_the_class_mapping(data, tmp_path):
    out = tmp_path / "out"
    r = clcalib("calibrate", "--arch", "resnet18", "--num-classes", "10", "--weights", WEIGHTS, "--calib",
                data["calib"], "--eval", data["named"], "--labels", data["labels"], "--out", out,
                "--method", "minmax", *FMNIST_PRE, "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["class_mapping"] == {c: i for i, c in enumerate(CLASSES)}
    assert re.search(r"evaluation classes +T-shirt=0, Trouser=1, Pullover=2", r.stdout), r.stdout


def test_report_html_is_one_offline_page_a_browser_renders(data, tmp_path):
    """report.html beside report.json: figures embedded (SVG), no external resource, rounded
    numbers, the warnings; rendered by a real browser (headless chromium) from the file alone."""
    import shutil

    out = tmp_path / "out"
    r = clcalib("calibrate", "--arch", "resnet18", "--num-classes", "10", "--weights", WEIGHTS, "--calib",
                data["calib"], "--eval", data["named"], "--out", out, "--method", "minmax", *FMNIST_PRE, "--quiet")
    assert r.returncode == 0, r.stderr
    page = (out / "report.html").read_text()
    report = json.loads((out / "report.json").read_text())
    assert page.count("<svg") == 4  # units, layers, per class, confusion matrix
    assert not re.search(r"""(src|href)=["']https?:""", page)  # nothing fetched from elsewhere
    assert f"{report['metrics']['quant_top1']:.2f} %" in page and "92.40000247955322" not in page
    assert "mapped to class indices in sorted order" in page  # the warning, in the report too
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed (apt-get install -y chromium)"
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "quantized top-1 (reloaded checkpoint)" in dom and "Per-layer SQNR" in dom
