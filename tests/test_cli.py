"""The command line on real files: config validation, one-line errors, and a short end-to-end
calibration of the reference model on real Fashion-MNIST PNGs whose reported accuracy the
saved checkpoint reproduces exactly."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from clcalib.config import CalibConfig
from clcalib.recon.phases import PHASES
from clcalib.testing import REFERENCE, calibration_indices, run_cli, write_zip

WEIGHTS = REFERENCE / "fmnist_resnet18.safetensors"
FMNIST_PRE = ["--resize", "none", "--crop", "none", "--mean", "0.286", "--std", "0.353"]


clcalib = run_cli  # the CLI in this process; process=True: its own process (the round trip below)


@pytest.fixture(scope="module")
def zips(tmp_path_factory):
    d = tmp_path_factory.mktemp("fmnist")
    return {"calib": write_zip(d / "calib.zip", "train", calibration_indices(128, seed=0), by_class=False),
            "eval": write_zip(d / "eval.zip", "t10k", range(500), by_class=True)}


@pytest.mark.parametrize("bad, message", [
    ({"w_bits": 1}, "greater than or equal to 2"),
    ({"a_bits": 9}, "less than or equal to 8"),
    ({"method": "gptq"}, "Input should be 'minmax'"),
    ({"iterz": 10}, "Extra inputs are not permitted"),
    ({"preprocess": {"std": [0, 1, 1]}}, "std must be positive"),
    ({"method": "mse", "cl_calib": {"enabled": True}}, "cl_calib needs a reconstruction method"),
    ({"device": "tpu"}, "String should match pattern"),
    ({"preprocess": {"std": [float("nan")] * 3}}, "finite number"),
    ({"preprocess": {"mean": [float("inf")] * 3}}, "finite number"),
    ({"beta": [float("nan"), 2.0]}, "finite number"),
])
def test_config_rejects_bad_values_with_a_message(bad, message):
    with pytest.raises(ValidationError, match=message):
        CalibConfig.model_validate(bad)


def test_config_defaults_are_the_papers():
    c = CalibConfig()
    assert (c.iters, c.batch_size, c.calib_size, c.lr_round, c.lr_act, c.drop_prob, c.first_last_bits, c.act_range_p) == (
        20000, 32, 1024, 3e-3, 4e-5, 0.5, 8, 2.4)
    assert CalibConfig.model_validate({"preprocess": {"mean": 0.5}}).preprocess.mean == (0.5, 0.5, 0.5)


def test_qdrop_flags_reach_the_config_fields_of_the_same_name():
    import argparse

    from clcalib.cli import _add_calibrate, config_from_args

    parser = argparse.ArgumentParser()
    _add_calibrate(parser.add_subparsers())
    argv = ["calibrate", "--arch", "resnet18", "--num-classes", "10", "--weights", "w", "--calib", "c", "--out", "o",
            "--drop-scope", "all", "--drop-prob", "0.3"]
    c = config_from_args(parser.parse_args(argv))
    assert (c.drop_scope, c.drop_prob, CalibConfig().drop_scope) == ("all", 0.3, "input")
    with pytest.raises(SystemExit):  # argparse names the choices on stderr
        parser.parse_args([*argv[:-4], "--drop-scope", "inside"])


def _parsed(*flags) -> CalibConfig:
    import argparse

    from clcalib.cli import _add_calibrate, config_from_args

    parser = argparse.ArgumentParser()
    _add_calibrate(parser.add_subparsers())
    argv = ["calibrate", "--arch", "resnet18", "--num-classes", "10", "--weights", "w", "--calib", "c", "--out", "o"]
    return config_from_args(parser.parse_args([*argv, *map(str, flags)]))


def test_the_old_nce_form_stays_selectable(tmp_path):
    old = {"critic": "nce", "lambda": 0.1}
    by_flags = _parsed("--cl-calib", "--cl-critic", "nce", "--cl-lambda", "0.1").cl_calib
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"cl_calib": {"enabled": True, **old}}))
    by_file = _parsed("--config", cfg_file).cl_calib
    for c in (by_flags, by_file):
        assert (c.enabled, c.critic, c.lambda_, c.tau, c.mapping) == (True, "nce", 0.1, 0.5, "fp_tail")
    assert _parsed("--cl-calib", "--cl-every", "4").cl_calib.every == 4  # the cheaper schedule of the term
    assert _parsed("--cl-calib", "--cl-tail-units", "2").cl_calib.tail_units == 2  # the shorter, cheaper tail
    assert _parsed("--cl-calib", "--cl-every", "8", "--cl-hold").cl_calib.hold  # the turn's gradient held between turns
    assert not _parsed("--cl-calib", "--cl-every", "8", "--no-cl-hold").cl_calib.hold  # the pulses of older rows
    assert not _parsed("--cl-calib", "--cl-every", "1").cl_calib.hold  # the every-iteration form


def test_cl_calib_flag_gets_the_relational_form_and_the_report_records_it_and_the_draw(zips, tmp_path):
    out = tmp_path / "out"
    r = clcalib("calibrate", "--arch", "resnet18", "--num-classes", "10", "--weights", WEIGHTS, "--calib", zips["calib"],
                "--method", "qdrop", "--w-bits", "4", "--a-bits", "4", "--iters", "1", "--calib-size", "16",
                "--calib-seed", "3", "--cl-calib", "--device", "cpu", *FMNIST_PRE, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    cl = report["config"]["cl_calib"]
    assert (cl["enabled"], cl["critic"], cl["lambda"], cl["every"], cl["hold"]) == (True, "relational", 10.0, 8, True)
    assert report["metrics"]["cl_calib"] == cl
    assert report["config"]["calib_seed"] == 3 and report["calib_draw"] == {"seed": 3, "supplied": 128}
    assert "qdrop+CL(relational, lambda 10, every 8 held)" in r.stdout and "16 of 128 supplied, draw 3" in r.stdout, r.stdout


@pytest.mark.parametrize("args, message", [
    (["--arch", "resnet19"], "unknown arch 'resnet19'; known: resnet18, resnet34"),
    (["--weights", "/nonexistent.safetensors"], "no such weights file"),
    (["--num-classes", "11"], "mis-shaped: fc.bias (expected (11,), got (10,))"),
    (["--w-bits", "9"], "invalid config: w_bits: Input should be less than or equal to 8"),
    (["--calib", "/nonexistent"], "no such file or directory"),
])
def test_cli_errors_are_one_clear_line(args, message, zips, tmp_path):
    base = {"--arch": "resnet18", "--num-classes": "10", "--weights": WEIGHTS, "--calib": zips["calib"],
            "--out": tmp_path, "--iters": "1"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    r = clcalib("calibrate", *[x for kv in base.items() for x in kv], *FMNIST_PRE)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_calibrate_then_evaluate_reproduces_the_report(zips, tmp_path):
    out = tmp_path / "out"
    r = clcalib("calibrate", "--arch", "resnet18", "--num-classes", "10", "--weights", WEIGHTS,
                "--calib", zips["calib"], "--eval", zips["eval"], "--method", "qdrop", "--w-bits", "4", "--a-bits", "4",
                "--iters", "5", "--calib-size", "128", "--device", "cpu", "--seed", "1", *FMNIST_PRE, "--out", out, "--quiet",
                "--export", "onnx", process=True)
    assert r.returncode == 0, r.stderr
    assert "quantized top-1 % (reloaded checkpoint)" in r.stdout
    report = json.loads((out / "report.json").read_text())
    m = report["metrics"]
    assert m["fp_top1"] > 85 and m["quant_top1"] > 80, m  # W4A4 barely moves this model
    assert 0 < m["top1_agreement"] <= 100 and m["sqnr_db"] > 5
    assert m["compression_vs_fp32"] > 5 and m["calibration_seconds"] > 0
    # where the time went: every phase named, together the whole calibration but the progress bar
    phases = m["phase_seconds"]
    assert list(phases) == list(PHASES) and min(phases.values()) >= 0 and phases["loop"] > 0, phases
    assert 0.8 * m["calibration_seconds"] <= sum(phases.values()) <= m["calibration_seconds"] + 0.01, phases
    assert report["config"]["preprocess"] == {"resize": None, "crop": None, "mean": [0.286] * 3, "std": [0.353] * 3}
    assert len(report["units"]) == 10 and all(u["loss_after"] >= 0 for u in report["units"])
    e = clcalib("evaluate", "--checkpoint", out / "quantized.safetensors", "--eval", zips["eval"], "--json")
    assert e.returncode == 0, e.stderr
    assert json.loads(e.stdout)["quant_top1"] == m["quant_top1"]
    # model.onnx beside the checkpoint, checked in ONNX Runtime on the same 500 images
    assert report["onnx"] == "model.onnx" and m["onnx_bytes"] == (out / "model.onnx").stat().st_size
    assert m["onnx_checked_images"] == 500 and m["onnx_top1_agreement"] >= 99.0, m
    # the default target runs the 4-bit activations as 8-bit codes over their calibrated ranges
    # (int8 kernels): at least as accurate as the calibrated model, and faster than FP32 there
    assert m["export_target"] == "onnxruntime" and m["onnx_top1"] >= m["quant_top1"] - 0.6, m
    assert set(m["onnx_latency"]["batches"]) == {"1", "32"}, m["onnx_latency"]
    # and both the summary and report.html say what that agreement is with
    assert "agreement with torch (run as the file runs: activations below 8 bits as 8-bit codes)" in r.stdout, r.stdout
    assert "run as the file runs" in (out / "report.html").read_text()
    from clcalib.export import read_header

    header = read_header(out / "quantized.safetensors")
    assert header["metrics"]["quant_top1"] == m["quant_top1"] and header["calib_images"] == 128
    assert Path(out / "quantized.safetensors").stat().st_size < 0.2 * WEIGHTS.stat().st_size * 2
    # exported again later from the checkpoint alone (no images: it stored the float tensors'
    # ranges from its calibration images), the file is the one this run checked, byte for byte
    again = clcalib("export", "--checkpoint", out / "quantized.safetensors", "--out", tmp_path / "again.onnx")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    assert "agreement on random inputs not required" in again.stdout  # random inputs saturate 8-bit ranges
    # with calibration images the ranges are measured again and the file is checked on them
    again = clcalib("export", "--checkpoint", out / "quantized.safetensors", "--out", tmp_path / "c.onnx",
                    "--calib", zips["calib"], "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["onnx_top1_agreement"] >= 97.0


def test_inspect_shows_units_layers_and_quantizers_before_calibrating():
    r = clcalib("inspect", "--arch", "resnet18", "--num-classes", "10", "--input-size", "28", "--w-bits", "2",
                "--a-bits", "4", "--json")
    assert r.returncode == 0, r.stderr
    units = json.loads(r.stdout)
    assert [u["unit"] for u in units][:3] == ["conv1", "layer1.0", "layer1.1"] and len(units) == 10
    layers = [la for u in units for la in u["layers"]]
    assert len(layers) == 21 and sum(la["params"] for la in layers) == 11_176_842  # BN folded into biases
    assert layers[0]["w_bits"] == layers[-1]["w_bits"] == 8 and {la["w_bits"] for la in layers[1:-1]} == {2}
    block = units[1]
    assert block["kind"] == "BasicBlock" and block["out_bits"] == 4
    assert [la["out_bits"] for la in block["layers"]] == [4, None]  # conv2 feeds the residual sum in FP
    assert units[-2]["out_bits"] == 8 and units[-1]["layers"][0]["out_bits"] is None  # fc input 8-bit, logits FP
    r = clcalib("inspect", "--arch", "resnet18", "--num-classes", "10", "--input-size", "28", "--act-placement",
                "every_layer", "--json")
    assert [la["out_bits"] for la in json.loads(r.stdout)[1]["layers"]] == [4, 4]
    r = clcalib("inspect", "--arch", "resnet19", "--num-classes", "10")
    assert r.returncode == 2 and "unknown arch 'resnet19'" in r.stderr
