"""The one entry point: ``clcalib.calibrate(model, calibration_data, config, on_progress)``.

(Named calibration.py, not calibrate.py: a submodule named like the function would shadow
``clcalib.calibrate`` once imported.)"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from clcalib.config import CalibConfig
from clcalib.data import draw, tensor_sha256
from clcalib.errors import ConfigError, DataError, UnsupportedModel
from clcalib.graph.partition import QuantModel, QuantSpec, is_mobile_like
from clcalib.graph.trace import snap_biases
from clcalib.progress import ProgressCallback, ProgressEvent
from clcalib.quant.switch import quantization
from clcalib.recon.engine import Reconstructor, TermsFactory, UnitReport
from clcalib.recon.phases import PhaseClock
from clcalib.recon.resume import ResumeStore
from clcalib.recon.terms.unit import unit_terms


@dataclass
class CalibrationResult:
    model: QuantModel  # quantized, integer weights, eval mode, on the calibration device
    config: CalibConfig
    units: list[UnitReport]
    calibration_seconds: float
    calib_sha256: str
    device: str
    metrics: dict = field(default_factory=dict)


@contextmanager
def exact_numerics():
    """FP32 convolutions and matmuls (no TF32) and deterministic cuDNN kernels while calibrating
    and measuring: the reported accuracy must be what an FP32 runtime of the checkpoint gives,
    and a resumed run must equal an uninterrupted one. Restores the previous settings."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark)
    cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark = False, False, True, False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=cpu or auto")
    return dev


@torch.no_grad()
def _check_conversion(model: nn.Module, qm: QuantModel, x: Tensor) -> None:
    """With quantization off, the converted model must compute what the original computes;
    outside the registered blocks, BN/activation fusion follows module order, which a custom
    model's forward need not."""
    if isinstance(model, torch.export.ExportedProgram):
        ref = model.module()(x.cpu()).float().cpu()
    else:
        was_training = model.training
        model.eval()
        try:
            dev = next(iter(model.parameters()), torch.empty(0)).device
            ref = model(x.to(dev)).float().cpu()
        finally:
            model.train(was_training)
    with quantization(qm, False):
        got = qm(x).float().cpu()
    err = float((got - ref).abs().max())
    if not err <= 1e-3 * max(1.0, float(ref.abs().max())):
        raise UnsupportedModel(f"after folding BatchNorm and fusing activations the model's outputs differ by {err:.3g}; "
                               "its forward does not follow its module order; calibrate it with partition=graph")


def default_round_weight(cfg: CalibConfig, model: nn.Module | QuantModel) -> float:
    if cfg.round_weight is not None:
        return cfg.round_weight
    return 0.1 if is_mobile_like(model) else 0.01  # AdaRound's weight for depthwise nets


def _resume_key(model: nn.Module, calib_sha: str, cfg: CalibConfig) -> str:
    from clcalib import __version__

    h = hashlib.sha256(calib_sha.encode())
    h.update(__version__.encode())  # an upgraded worker must not resume units an older version made
    # device included: CPU and GPU runs differ in the last bits; export only decides extra artifacts;
    # cache_placement moves tensors, not results (the host plan stages the same batches)
    h.update(cfg.model_dump_json(exclude={"export", "cache_placement"}).encode())
    state = model.state_dict if isinstance(model, torch.export.ExportedProgram) else model.state_dict()
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def calibrate(
    model: nn.Module,
    calibration_data: Tensor | Iterable,
    config: CalibConfig | dict | None = None,
    on_progress: ProgressCallback | None = None,
    *,
    resume_dir: str | Path | None = None,
    terms: TermsFactory | None = None,
) -> CalibrationResult:
    """Quantize ``model`` (a float classifier: any nn.Module, or a torch.export program) by
    ``config.method`` on ``calibration_data``
    (N x C x H x W, already preprocessed; or an iterable of such batches, e.g. a DataLoader of
    (image, label) pairs, of which the first ``config.calib_size`` images are used). Of a larger
    tensor, ``config.calib_seed`` draws ``calib_size`` images; null: the first ``calib_size``. ``on_progress`` receives ProgressEvents and may raise
    Canceled; without one, a line per finished unit goes to stderr (``clcalib.progress.PrintProgress``).
    With ``resume_dir``, state is saved after each unit and a rerun on the same
    inputs continues after the last finished unit. ``terms``: what each unit's loss gets beside
    its MSE (default ``clcalib.recon.terms.unit.unit_terms``: PD-Quant and CL-Calib as configured)."""
    if on_progress is None:
        from clcalib.progress import PrintProgress

        on_progress = PrintProgress()
    with exact_numerics():
        return _calibrate(model, calibration_data, config, on_progress, resume_dir, terms)


def gather_batches(batches: Iterable, limit: int) -> Tensor:
    """The first ``limit`` images of an iterable of batches: tensors N x C x H x W, or tuples
    and lists whose first item is one (a DataLoader over (image, label) pairs)."""
    if isinstance(batches, (str, Path)) or not isinstance(batches, Iterable):
        raise DataError(f"calibration data must be a N x C x H x W tensor or an iterable of such batches "
                        f"(e.g. a DataLoader), got {type(batches).__name__}")
    got, n = [], 0
    for b in batches:
        x = b[0] if isinstance(b, (tuple, list)) else b
        if not isinstance(x, Tensor) or x.ndim != 4:
            what = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise DataError(f"each calibration batch must be a N x C x H x W tensor (or a tuple starting with "
                            f"one), got {what}")
        got.append(x[: limit - n].detach().cpu())
        n += len(got[-1])
        if n >= limit:
            break
    if not got:
        raise DataError("the calibration batches are empty")
    return torch.cat(got)


def _calibrate(
    model: nn.Module,
    calibration_data: Tensor,
    config: CalibConfig | dict | None,
    on_progress: ProgressCallback | None,
    resume_dir: str | Path | None,
    terms: TermsFactory | None,
) -> CalibrationResult:
    if isinstance(config, CalibConfig):
        cfg = config
    else:
        try:
            cfg = CalibConfig.model_validate(config or {})
        except ValidationError as e:
            raise ConfigError(f"invalid config: {e}") from None
    if not isinstance(calibration_data, Tensor):
        calibration_data = gather_batches(calibration_data, cfg.calib_size)
    if calibration_data.ndim != 4 or len(calibration_data) == 0:
        shape = tuple(calibration_data.shape) if isinstance(calibration_data, Tensor) else type(calibration_data).__name__
        raise DataError(f"calibration data must be a non-empty N x C x H x W tensor, got {shape}")
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = PhaseClock(device)
    t0 = time.perf_counter()
    with clock("setup"):
        if cfg.calib_seed is not None and len(calibration_data) > cfg.calib_size:  # the draw asked for
            data = calibration_data[draw(len(calibration_data), cfg.calib_size, cfg.calib_seed)].float()
        else:  # no draw named: the first calib_size images, as always
            data = calibration_data[: cfg.calib_size].float()
        calib_sha = tensor_sha256(data)
        torch.manual_seed(cfg.seed)
        data = data.to(device)
        if not torch.isfinite(data).all():
            raise DataError("calibration data holds NaN or infinite values")
        qm = QuantModel(model, QuantSpec.from_config(cfg), data[:2], cfg.partition).to(device)  # a copy: the caller's model stays
        _check_conversion(model, qm, data[:4])
    with clock("weight_ranges"):
        mse = cfg.method.spec.range_search
        for layer in qm.layers():
            layer.wq.init_range(layer.weight, mse=mse)

    with clock("probe"):
        rec = Reconstructor(qm, data, cfg, default_round_weight(cfg, qm), on_progress, terms or unit_terms, clock=clock)
    with clock("resume"):
        store = ResumeStore(resume_dir, _resume_key(model, calib_sha, cfg)) if resume_dir else None
        done, reports = store.load(qm) if store else (0, [])
    units = [UnitReport(**r) for r in reports]
    for k in range(done, len(rec.units)):
        units.append(rec.run_unit(k))
        if store:
            with clock("resume"):
                store.save(qm, k + 1, [u.to_dict() for u in units])
    with clock("finish"):
        qm.eval()
        snap_biases(qm)  # the integer runtime's biases, so ONNX Runtime computes what we report
    seconds = time.perf_counter() - t0
    if on_progress:
        on_progress(ProgressEvent(stage="done", unit=len(units), num_units=len(units), elapsed_s=seconds))
    # not in a phase: the progress callback outside the units' loops (in them it counts as loop)
    metrics = {"calibration_seconds": seconds, "resumed_units": done, "phase_seconds": clock.rounded()}
    if device.type == "cuda":  # tensors at the peak, and what torch's allocator held (the CUDA context comes on top)
        metrics["peak_device_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        metrics["peak_device_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return CalibrationResult(qm, cfg, units, seconds, calib_sha, str(device), metrics=metrics)
