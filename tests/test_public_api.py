"""clcalib's public surface, as clcalib/__init__.py lists it: the names a user imports, the
calls' parameters a user passes, and the error tree a user catches. Changing any of these is a
change of the public API: update this file, the README's examples and the changelog together."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import clcalib

PUBLIC = {
    "CalibConfig", "CalibrationError", "CalibrationResult", "Canceled", "ClCalib", "ConfigError", "DataError",
    "ExportError", "Method", "ModelMismatchError", "PdQuant", "Preprocess", "ProgressEvent", "UnsupportedModel",
    "calibrate", "load_quantized", "save_quantized",
}


def _params(fn) -> list[tuple[str, str]]:
    return [(p.name, p.kind.name) for p in inspect.signature(fn).parameters.values()]


def test_the_public_names_are_exported_and_resolve():
    assert set(clcalib.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(clcalib, name) is not None, name
    assert PUBLIC <= set(dir(clcalib))


def test_calibrate_takes_model_data_config_and_progress_in_that_order():
    params = _params(clcalib.calibrate)
    assert params[:4] == [("model", "POSITIONAL_OR_KEYWORD"), ("calibration_data", "POSITIONAL_OR_KEYWORD"),
                          ("config", "POSITIONAL_OR_KEYWORD"), ("on_progress", "POSITIONAL_OR_KEYWORD")]
    assert ("resume_dir", "KEYWORD_ONLY") in params
    assert all(kind == "KEYWORD_ONLY" for _, kind in params[4:])  # anything added later is keyword-only
    sig = inspect.signature(clcalib.calibrate)
    assert sig.parameters["config"].default is None and sig.parameters["on_progress"].default is None


def test_the_checkpoint_calls_keep_their_parameters():
    assert _params(clcalib.load_quantized) == [("path", "POSITIONAL_OR_KEYWORD"), ("device", "POSITIONAL_OR_KEYWORD")]
    assert inspect.signature(clcalib.load_quantized).parameters["device"].default == "cpu"
    assert _params(clcalib.save_quantized) == [
        ("qm", "POSITIONAL_OR_KEYWORD"), ("path", "POSITIONAL_OR_KEYWORD"), ("arch", "KEYWORD_ONLY"),
        ("num_classes", "KEYWORD_ONLY"), ("config", "KEYWORD_ONLY"), ("input_shape", "KEYWORD_ONLY"),
        ("extra", "KEYWORD_ONLY")]


def test_a_calibration_result_and_a_progress_event_carry_their_fields():
    assert [f.name for f in dataclasses.fields(clcalib.CalibrationResult)] == [
        "model", "config", "units", "calibration_seconds", "calib_sha256", "device", "metrics"]
    assert [f.name for f in dataclasses.fields(clcalib.ProgressEvent)] == [
        "stage", "unit", "num_units", "unit_name", "iteration", "iters", "loss", "elapsed_s", "eta_s", "message"]


def test_every_error_is_a_calibration_error_and_keeps_its_builtin_base():
    tree = {
        clcalib.ConfigError: ValueError, clcalib.ModelMismatchError: ValueError, clcalib.DataError: ValueError,
        clcalib.UnsupportedModel: clcalib.ModelMismatchError, clcalib.ExportError: clcalib.CalibrationError,
        clcalib.Canceled: clcalib.CalibrationError,
    }
    for cls, base in tree.items():
        assert issubclass(cls, clcalib.CalibrationError) and issubclass(cls, base), cls
    assert issubclass(clcalib.UnsupportedModel, NotImplementedError)  # callers that caught it before


def test_the_methods_a_config_names_are_stable():
    assert {m.value for m in clcalib.Method} >= {"minmax", "mse", "adaround", "brecq", "qdrop", "pdquant"}
    assert clcalib.CalibConfig.model_validate({"method": "qdrop", "w_bits": 4, "a_bits": 4}).method is clcalib.Method.QDROP


def test_importing_clcalib_does_not_import_torch():
    code = "import sys, clcalib, clcalib.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
