"""Calibrate -> export -> reload -> evaluate -> report: the one path the CLI and the worker share.

Accuracy is always measured on the model reloaded from the written checkpoint, so the report
describes exactly what a user downloads.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from clcalib.atomic import atomic_path
from clcalib.calibration import calibrate, exact_numerics, resolve_device
from clcalib.config import CalibConfig, ExportFormat
from clcalib.data import DEFAULT_LIMITS, LabeledSet, Limits, load_calibration
from clcalib.diagnostics import layer_sqnr, per_class
from clcalib.errors import Canceled, ConfigError, DataError, ExportError, ModelMismatchError
from clcalib.export import ModelSize, load_quantized, save_quantized, versions
from clcalib.graph.registry import build_model, read_state_dict
from clcalib.metrics import compare, predict, top1
from clcalib.progress import ProgressCallback, ProgressEvent
from clcalib.report_html import REPORT_HTML_NAME, write_report_html
from clcalib.traps import chance_warning, mapping_warning, upscale_warning

CHECKPOINT_NAME = "quantized.safetensors"
REPORT_NAME = "report.json"
ONNX_NAME = "model.onnx"
DIAGNOSTIC_IMAGES = 64  # calibration images the per-layer SQNR is measured on


def write_json_atomic(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=False, default=_json_default)


def _json_default(o):
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _finite(x):
    return None if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))) else x


def _quantized_logits(model, path: Path, calib, evalset, export: bool, device, config: CalibConfig
                      ) -> tuple[Tensor | None, dict]:
    """The reloaded model's logits on the evaluation set (None without one) and, with ``export``,
    model.onnx written for ``config.export_target`` and checked in its runtime on the same images
    in the same pass (else on the calibration images, without labels), with its latency against
    FP32 there; raises ExportError on a mismatch."""
    from clcalib.export.latency import latency_vs_fp32
    from clcalib.export.onnx_check import export_checked
    from clcalib.export.profiles import profile

    shape = (1, *calib.shape[1:])
    with exact_numerics():
        if not export:
            return (predict(model, evalset.images(), device=device) if evalset is not None else None), {}
        target = dict(target=config.export_target)  # the ranges the checkpoint stored: a later export's
        if evalset is None:
            q_logits, onnx = None, export_checked(model, path, shape, calib, device=device, **target)[0]
        else:
            onnx, q_logits = export_checked(model, path, shape, evalset.images(), evalset.labels, device=device, **target)
    onnx["onnx_latency"] = latency_vs_fp32(model.cpu(), path, shape, (1, config.batch_size),
                                           profile(config.export_target).runtime)
    model.to(device)
    return q_logits, onnx


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_exportable(model, example: Tensor, config: CalibConfig) -> None:
    """Raise ExportError (naming the op) unless the model, converted as calibration will convert
    it, has an ONNX translation for every op: a few seconds before calibrating, not hours after."""
    from clcalib.export.onnx_qdq import build_onnx
    from clcalib.graph.partition import QuantModel, QuantSpec

    qm = QuantModel(model, QuantSpec.from_config(config), example, config.partition)
    try:
        try:
            build_onnx(qm, (1, *example.shape[1:]), quantized=False)
        except ExportError:
            raise
        except Exception as e:  # an exporter bug on this form: a refusal now, not a failure after calibration
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ExportError(f"the exporter failed on this model ({type(e).__name__}: {first})") from None
    except ExportError as e:
        raise ExportError(f"the model cannot be exported to ONNX, which config.export asks: {e}. Leave \"onnx\" out "
                          "of config.export (no --export onnx) to calibrate it and keep the checkpoint") from None


def load_model(arch: str | None, num_classes: int | None, weights, model, model_name: str | None,
               config: CalibConfig) -> tuple:
    """(the FP model, its name, its classes, the config with the program's preprocessing where the
    user gave none, the notes saying so): a registry ``arch`` with ``num_classes`` and ``weights``,
    or ``model``, a torch.export program."""
    notes: list[str] = []  # what the run chose for the user (the report says so)
    if model is not None:
        from clcalib.graph.program import num_outputs, preprocess_for_program, read_program

        fp_model = read_program(model)
        arch, num_classes = model_name or Path(model).name, num_outputs(fp_model)
        given = set(config.preprocess.model_fields_set) if "preprocess" in config.model_fields_set else set()
        pre, note = preprocess_for_program(fp_model, config.preprocess, given)
        if note is not None:
            config = config.model_copy(update={"preprocess": pre})
            notes.append(note)
    elif arch is None or num_classes is None or weights is None:
        raise ModelMismatchError("give a registry arch with num_classes and weights, or an exported program (.pt2)")
    else:
        fp_model = build_model(arch, num_classes, read_state_dict(weights))
    return fp_model, arch, num_classes, config, notes


def run_calibration(
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    model: str | Path | None = None,
    calibration: str | Path,
    config: CalibConfig,
    out_dir: str | Path,
    evaluation: str | Path | None = None,
    on_progress: ProgressCallback | None = None,
    resume_dir: str | Path | None = None,
    limits: Limits = DEFAULT_LIMITS,
    labels: list[str] | None = None,
    model_name: str | None = None,
) -> dict:
    """Writes out_dir/quantized.safetensors and out_dir/report.json (each atomically) and
    returns the report dict. The model: ``arch`` + ``num_classes`` + ``weights`` (a registry
    architecture), or ``model``, a torch.export program (.pt2). ``resume_dir`` keeps per-unit state so a rerun with the same
    inputs continues after the last fully reconstructed unit. ``limits``: the bounds on
    reading the image sets (a service passes its operator's settings). ``labels``: the class
    names in the model's index order, for evaluation folders named by class. ``model_name``: the
    program's name in the report and checkpoint (default: its file name). ``on_progress`` may raise
    ``clcalib.errors.Canceled`` to stop between iterations. Raises only CalibrationError
    subclasses for bad inputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # the inputs: what the config cannot get refused first, then the model and the images read
    _check_config(config, evaluation)
    fp_model, arch, num_classes, config, notes = load_model(arch, num_classes, weights, model, model_name, config)
    inputs = _load_inputs(calibration, evaluation, config, limits, labels, num_classes)
    emit = on_progress or (lambda e: None)
    warnings = _Warnings(emit)
    device = resolve_device(config.device)
    fp_logits = _evaluate_fp(fp_model, inputs.evalset, device, emit)
    warnings.add(*_input_warnings(config, inputs, fp_logits, num_classes))
    _check_exportable_first(fp_model, inputs.calib, config, emit)

    result, config, mixed = _calibrate(fp_model, inputs, config, on_progress, resume_dir, fp_logits, device, warnings)

    # what a user downloads: the checkpoint, reloaded and measured (and exported)
    emit(ProgressEvent(stage="export", num_units=len(result.units), unit=len(result.units)))
    save = partial(_save_checkpoint, result, out / CHECKPOINT_NAME, arch, num_classes, config, inputs.calib)
    storage = save({})
    measured = _evaluate_quantized(out, inputs, config, device, emit, warnings, len(result.units))

    metrics = {**_quality_metrics(inputs.evalset, fp_logits, measured),
               **_run_metrics(result, storage, config, t0, warnings.messages)}
    classes = (per_class(fp_logits, measured.q_logits, inputs.evalset.labels, num_classes)
               if inputs.evalset is not None else None)
    report = _report(arch, num_classes, config, notes, inputs, result, metrics, classes, mixed, measured, device)
    _write_outputs(report, save, out)
    return report


@dataclass(frozen=True)
class _Inputs:
    calib: Tensor  # the calibration images, preprocessed
    evalset: LabeledSet | None  # the evaluation set (streamed in batches), None without one
    stats: dict  # what reading the calibration set found: images supplied, their smallest side


@dataclass(frozen=True)
class _Measured:
    """The reloaded checkpoint measured: its logits on the evaluation set (None without one), the
    ONNX export's metrics (empty without the export) and why the export failed after calibration
    (None: it did not, or was not asked)."""

    q_logits: Tensor | None
    onnx: dict
    export_error: str | None


class _Warnings:
    """The run's warnings: each one a progress event when found, all of them kept for the report."""

    def __init__(self, emit: ProgressCallback):
        self.emit = emit
        self.messages: list[str] = []

    def add(self, *messages: str) -> None:
        for w in messages:
            self.messages.append(w)
            self.emit(ProgressEvent(stage="warning", message=w))


def _check_config(config: CalibConfig, evaluation) -> None:
    """Refuse, before anything is read, what the config asks and cannot get: an ONNX target whose
    runtime is missing, an accuracy target without an evaluation set."""
    if ExportFormat.ONNX in config.export:  # before hours of calibration, not after
        from clcalib.export.profiles import check_target

        check_target(config.export_target, config.w_symmetric)
    if config.target is not None and evaluation is None:
        raise ConfigError("config.target needs an evaluation set (--evaluation, or the `evaluation` upload): the "
                          "search measures each candidate's top-1 there")


def _load_inputs(calibration, evaluation, config: CalibConfig, limits: Limits, labels: list[str] | None,
                 num_classes: int) -> _Inputs:
    """The calibration images and the evaluation set, refused (DataError) when the evaluation set
    does not fit the model's classes or the calibration images' shape."""
    stats: dict = {}
    calib = load_calibration(calibration, config.preprocess, config.calib_size, config.calib_draw, limits, stats)
    # the evaluation set streams in batches: any size, one batch in memory
    evalset = LabeledSet(evaluation, config.preprocess, limits, labels) if evaluation is not None else None
    if evalset is not None and int(evalset.labels.max()) >= num_classes:
        raise DataError(f"evaluation has class index {int(evalset.labels.max())} but the model has {num_classes} classes")
    if evalset is not None and evalset.shape != tuple(calib.shape[1:]):
        raise DataError(f"evaluation images come out {evalset.shape} but calibration data is "
                        f"{tuple(calib.shape[1:])}; use the same preprocessing (resize/crop) for both")
    return _Inputs(calib, evalset, stats)


def _evaluate_fp(fp_model, evalset: LabeledSet | None, device, emit: ProgressCallback) -> Tensor | None:
    """The FP model's logits on the evaluation set (None without one): measured first, so that a
    preprocessing mismatch shows before the long part."""
    if evalset is None:
        return None
    emit(ProgressEvent(stage="evaluate"))
    with exact_numerics():
        runnable = fp_model.module() if isinstance(fp_model, torch.export.ExportedProgram) else fp_model
        return predict(runnable.to(device), evalset.images(), device=device)


def _input_warnings(config: CalibConfig, inputs: _Inputs, fp_logits: Tensor | None, num_classes: int) -> list[str]:
    """The silent traps in the user's inputs (clcalib.traps)."""
    found = [upscale_warning(config.preprocess, inputs.stats.get("smallest_side"))]
    if inputs.evalset is not None:
        found.append(mapping_warning(inputs.evalset.mapping, inputs.evalset.by_name))
        found.append(chance_warning(top1(fp_logits, inputs.evalset.labels), num_classes))
    return [w for w in found if w]


def _check_exportable_first(fp_model, calib: Tensor, config: CalibConfig, emit: ProgressCallback) -> None:
    """With an ONNX export asked: every op translates (check_exportable), known now, not after calibration."""
    if ExportFormat.ONNX in config.export:
        emit(ProgressEvent(stage="prepare", message="checking the ONNX export"))
        check_exportable(fp_model, calib[:2], config)


def _calibrate(fp_model, inputs: _Inputs, config: CalibConfig, on_progress: ProgressCallback | None, resume_dir,
               fp_logits: Tensor | None, device, warnings: _Warnings) -> tuple:
    """(the CalibrationResult, the config it ran with, the report's mixed-precision section): uniform
    bits, or mixed precision under config.budget or config.target (its warnings added to ``warnings``)."""
    if config.budget is None and config.target is None:
        return calibrate(fp_model, inputs.calib, config, on_progress, resume_dir=resume_dir), config, None
    from clcalib.mixed.plan import calibrate_mixed

    result, config, mixed, mixed_warnings = calibrate_mixed(fp_model, inputs.calib, config, on_progress, resume_dir,
                                                            inputs.evalset, fp_logits, device)
    warnings.add(*mixed_warnings)
    return result, config, mixed


def _save_checkpoint(result, path: Path, arch: str, num_classes: int, config: CalibConfig, calib: Tensor,
                     extra: dict) -> ModelSize:
    """The calibrated model written to ``path``, its header naming the calibration images and ``extra``."""
    from clcalib.export.onnx_qdq import float_ranges

    header = {"calib_sha256": result.calib_sha256, "calib_images": len(calib)}
    with exact_numerics():  # what a later export writes without images: the file this run checks
        ranges = float_ranges(result.model, calib)
    if ranges is not None:
        header["float_ranges"] = ranges
    return save_quantized(result.model, path, arch=arch, num_classes=num_classes, config=config,
                          input_shape=(1, *calib.shape[1:]), extra={**header, **extra})


def _evaluate_quantized(out: Path, inputs: _Inputs, config: CalibConfig, device, emit: ProgressCallback,
                        warnings: _Warnings, num_units: int) -> _Measured:
    """The checkpoint in ``out`` reloaded, evaluated and, with config.export, exported to ONNX and
    checked. An export that fails after calibration is a warning, not an error: the checkpoint
    and the report are kept."""
    reloaded = load_quantized(out / CHECKPOINT_NAME, device=str(device))
    export = ExportFormat.ONNX in config.export
    if inputs.evalset is not None or export:
        emit(ProgressEvent(stage="evaluate" if inputs.evalset is not None else "export", num_units=num_units,
                           unit=num_units))
    export_error = None
    try:
        q_logits, onnx = _quantized_logits(reloaded, out / ONNX_NAME, inputs.calib, inputs.evalset, export, device,
                                           config)
        if note := onnx.get("onnx_check_note"):  # checked, but this CPU's int8 kernels would run it wrong
            warnings.add(note)
    except Exception as e:  # calibration is done: keep it, publish it, say what failed
        if isinstance(e, (MemoryError, Canceled)):
            raise
        export_error = str(e) if isinstance(e, ExportError) else f"{type(e).__name__}: {str(e)[:300]}"
        warnings.add(f"the ONNX export failed after calibration ({export_error}); the checkpoint and this report "
                     f"are complete: run `clcalib export --checkpoint {CHECKPOINT_NAME} --out model.onnx` "
                     "once the exporter supports the model")
        q_logits, onnx = _quantized_logits(reloaded, out / ONNX_NAME, inputs.calib, inputs.evalset, False, device,
                                           config)
    return _Measured(q_logits, onnx, export_error)


def _quality_metrics(evalset: LabeledSet | None, fp_logits: Tensor | None, measured: _Measured) -> dict:
    """The quantized model against the FP one on the evaluation set (nulls without one), and the export's figures."""
    metrics: dict = {"fp_top1": None, "quant_top1": None, "top1_agreement": None, "sqnr_db": None}
    metrics.update(measured.onnx)
    if measured.export_error is not None:
        metrics["export_error"] = measured.export_error
    if evalset is not None:
        metrics.update({k: _finite(v) for k, v in compare(fp_logits, measured.q_logits, evalset.labels).items()})
        metrics["eval_images"] = len(evalset.labels)
    return metrics


def _run_metrics(result, storage: ModelSize, config: CalibConfig, t0: float, warnings: list[str]) -> dict:
    """What the run took and gave: times, sizes, memory, warnings, CL-Calib's settings, the added
    loss terms' curves."""
    metrics = {
        "calibration_seconds": result.calibration_seconds,
        "phase_seconds": result.metrics.get("phase_seconds"),  # where calibration_seconds went (recon.phases)
        "total_seconds": time.perf_counter() - t0,
        "weight_bytes": storage.quantized_bytes,
        "fp32_weight_bytes": storage.fp32_bytes,
        "compression_vs_fp32": storage.ratio,
        "resumed_units": result.metrics.get("resumed_units", 0),
        "peak_device_memory_bytes": result.metrics.get("peak_device_memory_bytes"),  # null on the CPU
        "peak_device_reserved_bytes": result.metrics.get("peak_device_reserved_bytes"),
        "warnings": warnings,
    }
    if config.cl_calib.enabled:
        metrics["cl_calib"] = config.cl_calib.model_dump(mode="json", by_alias=True)
    curves = {u.name: {k: {"first": _finite(v[0]), "last": _finite(v[-1]), "curve": [_finite(x) for x in v]}
                       for k, v in u.extra.items() if v}
              for u in result.units if u.extra}
    if curves:
        metrics["added_loss_curves"] = curves  # per unit: CL / PD terms over the iterations
    return metrics


def _report(arch: str, num_classes: int, config: CalibConfig, notes: list[str], inputs: _Inputs, result,
            metrics: dict, classes, mixed: dict | None, measured: _Measured, device) -> dict:
    """report.json's content, less the files' hashes."""
    return {
        "arch": arch,
        "num_classes": num_classes,
        "config": config.model_dump(mode="json", by_alias=True),
        "device": result.device,
        "calib_images": len(inputs.calib),
        "calib_sha256": result.calib_sha256,
        # which images: the draw (calib_seed, else seed) of calib_images out of the supplied set
        "calib_draw": {"seed": config.calib_draw, "supplied": inputs.stats.get("supplied")},
        "notes": notes,
        "metrics": metrics,
        "units": [{k: _finite(v) for k, v in u.to_dict().items()} for u in result.units],
        "class_mapping": inputs.evalset.mapping if inputs.evalset is not None else None,
        "per_class": classes,
        # the in-memory model still holds the FP weights beside their rounding (the checkpoint only the latter)
        "layers": layer_sqnr(result.model, inputs.calib[:DIAGNOSTIC_IMAGES].to(device)),
        "layer_images": min(DIAGNOSTIC_IMAGES, len(inputs.calib)),
        "mixed_precision": mixed,  # sensitivity, allocation and the target's search (null: uniform bits)
        "checkpoint": CHECKPOINT_NAME,
        "onnx": ONNX_NAME if ExportFormat.ONNX in config.export and measured.export_error is None else None,
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
    }


def _write_outputs(report: dict, save, out: Path) -> None:
    """The checkpoint again, now with the measured metrics in its header (same tensors), then the
    files' hashes into the report, report.json and report.html."""
    save({"metrics": report["metrics"]})
    # what the downloads must hash to (the service checks its uploads against it, clients their downloads)
    hashed = [out / CHECKPOINT_NAME] + ([out / ONNX_NAME] if report["onnx"] else [])
    report["sha256"] = {p.name: _sha256(p) for p in hashed}
    write_json_atomic(report, out / REPORT_NAME)
    write_report_html(report, out / REPORT_HTML_NAME)
