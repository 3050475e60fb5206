"""Calibrate -> export -> reload -> evaluate -> report: the one path the CLI and the worker share.

Accuracy is always measured on the model reloaded from the written checkpoint, so the report
describes exactly what a user downloads.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from clcalib.atomic import atomic_path
from clcalib.calibration import calibrate, exact_numerics, resolve_device
from clcalib.config import CalibConfig, ExportFormat
from clcalib.data import DEFAULT_LIMITS, LabeledSet, Limits, load_calibration
from clcalib.diagnostics import layer_sqnr, per_class
from clcalib.errors import Canceled, ConfigError, DataError, ExportError, ModelMismatchError
from clcalib.export import load_quantized, save_quantized, versions
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
        target = dict(target=config.export_target, range_images=calib)
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
    if ExportFormat.ONNX in config.export:  # before hours of calibration, not after
        from clcalib.export.profiles import check_target

        check_target(config.export_target, config.w_symmetric)
    if config.target is not None and evaluation is None:
        raise ConfigError("config.target needs an evaluation set (--evaluation, or the `evaluation` upload): the "
                          "search measures each candidate's top-1 there")
    fp_model, arch, num_classes, config, notes = load_model(arch, num_classes, weights, model, model_name, config)
    stats: dict = {}
    calib = load_calibration(calibration, config.preprocess, config.calib_size, config.calib_draw, limits, stats)
    # the evaluation set streams in batches: any size, one batch in memory
    evalset = LabeledSet(evaluation, config.preprocess, limits, labels) if evaluation is not None else None
    if evalset is not None and int(evalset.labels.max()) >= num_classes:
        raise DataError(f"evaluation has class index {int(evalset.labels.max())} but the model has {num_classes} classes")
    if evalset is not None and evalset.shape != tuple(calib.shape[1:]):
        raise DataError(f"evaluation images come out {evalset.shape} but calibration data is "
                        f"{tuple(calib.shape[1:])}; use the same preprocessing (resize/crop) for both")

    emit = on_progress or (lambda e: None)
    device = resolve_device(config.device)
    warnings = [upscale_warning(config.preprocess, stats.get("smallest_side"))]
    fp_logits = None
    if evalset is not None:  # the FP model first: a preprocessing mismatch shows before the long part
        warnings.append(mapping_warning(evalset.mapping, evalset.by_name))
        emit(ProgressEvent(stage="evaluate"))
        with exact_numerics():
            runnable = fp_model.module() if isinstance(fp_model, torch.export.ExportedProgram) else fp_model
            fp_logits = predict(runnable.to(device), evalset.images(), device=device)
        warnings.append(chance_warning(top1(fp_logits, evalset.labels), num_classes))
    warnings = [w for w in warnings if w]
    for w in warnings:
        emit(ProgressEvent(stage="warning", message=w))

    if ExportFormat.ONNX in config.export:  # every op translates: known now, not after calibration
        emit(ProgressEvent(stage="prepare", message="checking the ONNX export"))
        check_exportable(fp_model, calib[:2], config)

    mixed, mixed_warnings = None, []
    if config.budget is not None or config.target is not None:
        from clcalib.mixed.plan import calibrate_mixed

        result, config, mixed, mixed_warnings = calibrate_mixed(fp_model, calib, config, on_progress, resume_dir,
                                                                evalset, fp_logits, device)
        for w in mixed_warnings:
            emit(ProgressEvent(stage="warning", message=w))
        warnings += mixed_warnings
    else:
        result = calibrate(fp_model, calib, config, on_progress, resume_dir=resume_dir)
    emit(ProgressEvent(stage="export", num_units=len(result.units), unit=len(result.units)))
    ckpt = out / CHECKPOINT_NAME
    header = {"calib_sha256": result.calib_sha256, "calib_images": len(calib)}

    def save(extra: dict):
        return save_quantized(result.model, ckpt, arch=arch, num_classes=num_classes, config=config,
                              input_shape=(1, *calib.shape[1:]), extra={**header, **extra})

    storage = save({})

    reloaded = load_quantized(ckpt, device=str(device))
    metrics: dict = {"fp_top1": None, "quant_top1": None, "top1_agreement": None, "sqnr_db": None}
    classes = None
    export = ExportFormat.ONNX in config.export
    if evalset is not None or export:
        emit(ProgressEvent(stage="evaluate" if evalset is not None else "export", num_units=len(result.units),
                           unit=len(result.units)))
    export_error = None
    try:
        q_logits, onnx = _quantized_logits(reloaded, out / ONNX_NAME, calib, evalset, export, device, config)
    except Exception as e:  # calibration is done: keep it, publish it, say what failed
        if isinstance(e, (MemoryError, Canceled)):
            raise
        export_error = str(e) if isinstance(e, ExportError) else f"{type(e).__name__}: {str(e)[:300]}"
        warnings.append(f"the ONNX export failed after calibration ({export_error}); the checkpoint and this report "
                        f"are complete: run `clcalib export --checkpoint {CHECKPOINT_NAME} --out model.onnx` "
                        "once the exporter supports the model")
        emit(ProgressEvent(stage="warning", message=warnings[-1]))
        q_logits, onnx = _quantized_logits(reloaded, out / ONNX_NAME, calib, evalset, False, device, config)
    metrics.update(onnx)
    if export_error is not None:
        metrics["export_error"] = export_error
    if evalset is not None:
        metrics.update({k: _finite(v) for k, v in compare(fp_logits, q_logits, evalset.labels).items()})
        metrics["eval_images"] = len(evalset.labels)
        classes = per_class(fp_logits, q_logits, evalset.labels, num_classes)
    metrics.update({
        "calibration_seconds": result.calibration_seconds,
        "total_seconds": time.perf_counter() - t0,
        "weight_bytes": storage.quantized_bytes,
        "fp32_weight_bytes": storage.fp32_bytes,
        "compression_vs_fp32": storage.ratio,
        "resumed_units": result.metrics.get("resumed_units", 0),
        "peak_device_memory_bytes": result.metrics.get("peak_device_memory_bytes"),  # null on the CPU
        "peak_device_reserved_bytes": result.metrics.get("peak_device_reserved_bytes"),
        "warnings": warnings,
    })
    if config.cl_calib.enabled:
        metrics["cl_calib"] = config.cl_calib.model_dump(mode="json", by_alias=True)
    curves = {u.name: {k: {"first": _finite(v[0]), "last": _finite(v[-1]), "curve": [_finite(x) for x in v]}
                       for k, v in u.extra.items() if v}
              for u in result.units if u.extra}
    if curves:
        metrics["added_loss_curves"] = curves  # per unit: CL / PD terms over the iterations
    report = {
        "arch": arch,
        "num_classes": num_classes,
        "config": config.model_dump(mode="json", by_alias=True),
        "device": result.device,
        "calib_images": len(calib),
        "calib_sha256": result.calib_sha256,
        # which images: the draw (calib_seed, else seed) of calib_images out of the supplied set
        "calib_draw": {"seed": config.calib_draw, "supplied": stats.get("supplied")},
        "notes": notes,
        "metrics": metrics,
        "units": [{k: _finite(v) for k, v in u.to_dict().items()} for u in result.units],
        "class_mapping": evalset.mapping if evalset is not None else None,
        "per_class": classes,
        # the in-memory model still holds the FP weights beside their rounding (the checkpoint only the latter)
        "layers": layer_sqnr(result.model, calib[:DIAGNOSTIC_IMAGES].to(device)),
        "layer_images": min(DIAGNOSTIC_IMAGES, len(calib)),
        "mixed_precision": mixed,  # sensitivity, allocation and the target's search (null: uniform bits)
        "checkpoint": CHECKPOINT_NAME,
        "onnx": ONNX_NAME if ExportFormat.ONNX in config.export and export_error is None else None,
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
    }
    save({"metrics": metrics})  # same tensors, now with the measured metrics in the header
    # what the downloads must hash to (the service checks its uploads against it, clients their downloads)
    hashed = [ckpt] + ([out / ONNX_NAME] if report["onnx"] else [])
    report["sha256"] = {p.name: _sha256(p) for p in hashed}
    write_json_atomic(report, out / REPORT_NAME)
    write_report_html(report, out / REPORT_HTML_NAME)
    return report
