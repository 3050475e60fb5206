"""Upload checks that need torch. They run in the validator's sandboxed child processes only
(see ``service.validation`` and ``jobs.sandbox``); importing this module imports nothing heavy,
calling it does.

Each returns a plain dict: ``{"ok": True, ...}`` or ``{"ok": False, "field", "code", "message"}``.
"""

from __future__ import annotations

import random
from pathlib import Path

from jobs.store import PROGRAM


def warm_sandbox_child(threads: int = 1) -> None:
    """Run by ``jobs.sandbox`` in a check's child before it is confined: the heavy imports."""
    import os

    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the validator never touches a GPU
    import torch

    import clcalib.data  # noqa: F401
    import clcalib.graph.partition  # noqa: F401
    import clcalib.graph.program  # noqa: F401
    import clcalib.graph.registry  # noqa: F401

    torch.set_num_threads(threads)


def list_archs() -> list[str]:
    from clcalib.graph.registry import ARCHS

    return list(ARCHS)


def ready_info() -> dict:
    """Sent by each check process when its imports are done: the API process never imports torch."""
    return {"archs": list_archs()}


def _fail(field: str, code: str, message: str) -> dict:
    return {"ok": False, "field": field, "code": code, "message": message}


def check_job(**kwargs) -> dict:
    """``_check_job``; a refusal that was really an allocation refused under the validator's
    memory cap is reported as that (the validator answers 422 check_memory naming the cap)."""
    from jobs.sandbox import is_out_of_memory

    res = _check_job(**kwargs)
    if not res["ok"] and is_out_of_memory(res["message"]):
        raise MemoryError(res["message"])
    return res


class _Refused(Exception):
    """A check's refusal, raised by a step and answered as ``_fail``'s dict by ``_check_job``."""

    def __init__(self, field: str, code: str, message: str):
        super().__init__(message)
        self.answer = _fail(field, code, message)


def _check_job(*, model: str, arch: str, num_classes: int | None, calibration: str, evaluation: str | None,
               config: dict, limits: dict, sample: int, labels: str | None = None,
               worker_memory_bytes: int = 0, preprocess_given: list[str] | None = None) -> dict:
    """The job's inputs, checked as the worker will use them; ``arch`` PROGRAM: ``model`` is a
    torch.export program, converted here as calibration will convert it (so an unsupported
    graph is a 422 now, not a failed job later). Returns ok, counts and num_classes, and for a
    program with a fixed square input where ``preprocess_given`` (the config.preprocess fields the
    user set) lacks resize/crop, ``preprocess``: the config's preprocessing with the program's size."""
    from clcalib.config import CalibConfig
    from clcalib.data import Limits

    cfg = CalibConfig.model_validate(config)
    lim = Limits(**limits)
    try:
        # 1. the weights fit the arch, or the program is one we read safely
        program, net, num_classes, cfg, preprocess_note = _model(model, arch, num_classes, cfg, preprocess_given)
        # 2. the calibration data is readable, non-empty, and decodes (a seeded sample of it)
        count, x = _calibration(calibration, cfg, lim, sample)
        # 3. the model runs on it, in the worker's memory, and a program converts to units
        probe_s, peak = _model_runs(net, program, arch, num_classes, x, count, cfg, worker_memory_bytes)
        if program is not None:
            _program_converts(program, cfg, x)
        if cfg.layer_bits or cfg.budget is not None or cfg.target is not None:
            _bits_fit(program if program is not None else net, program is not None, cfg, x)
        # 4. the evaluation set: class folders that fit num_classes, decodable, same size
        n_eval = 0 if evaluation is None else _evaluation(evaluation, labels, cfg, lim, sample, num_classes, x)
    except _Refused as r:
        return r.answer
    out = {"ok": True, "calibration_count": count, "evaluation_count": n_eval, "num_classes": num_classes,
           "estimated_peak_bytes": peak["total"], "work_s": _work_s(cfg, probe_s, len(x[:2]), min(count, cfg.calib_size))}
    if preprocess_note is not None:
        out["preprocess"] = cfg.preprocess.model_dump(mode="json")
    return out


def _model(model: str, arch: str, num_classes: int | None, cfg, preprocess_given: list[str] | None):
    """(program or None, the nn.Module, num_classes, the config, the program's preprocessing note)."""
    from clcalib.errors import ModelMismatchError
    from clcalib.graph.registry import build_model, read_state_dict

    program = preprocess_note = None
    try:
        if arch == PROGRAM:
            from clcalib.graph.program import num_outputs, read_program

            program = read_program(model)
            classes = num_outputs(program)
            if num_classes is not None and num_classes != classes:
                raise ModelMismatchError(f"the program returns {classes} classes, num_classes says {num_classes}")
            num_classes, net = classes, program.module()
            from clcalib.errors import UnsupportedModel
            from clcalib.graph.program import preprocess_for_program

            try:
                pre, preprocess_note = preprocess_for_program(program, cfg.preprocess, set(preprocess_given or []))
            except UnsupportedModel as e:
                raise _Refused("model", "unsupported_model", str(e)) from None
            if preprocess_note is not None:
                cfg = cfg.model_copy(update={"preprocess": pre})
        else:
            net = build_model(arch, num_classes, read_state_dict(model))
    except ModelMismatchError as e:
        raise _Refused("model", "model_mismatch", str(e).replace(str(Path(model).parent) + "/", "")) from None
    return program, net, num_classes, cfg, preprocess_note


def _images(path: str, role: str, cfg, lim, sample: int, used: int | None = None):
    """(names, the first two sampled images): every header read, a seeded sample decoded
    one at a time (memory: two images and the one being decoded, whatever the sample size),
    and a set the worker will stack (``used`` images of it: the calibration set) held to its
    memory budget."""
    import torch

    from clcalib.data import DataError, ImageSource, check_set_bytes, decoded, output_size, shown

    src = ImageSource(path, lim)
    try:
        names = src.names
        pick = sorted(random.Random(0).sample(names, min(sample, len(names))))
        chosen = set(pick)
        kept: list = []
        for t in decoded(src, pick, cfg.preprocess):
            if len(kept) < 2:
                kept.append(t)
        size = tuple(kept[0].shape[-2:])
        for n in names:  # every other image's header: readable, under the pixel cap, the sample's size after preprocess
            if n not in chosen:
                got = output_size(*_header(src, n, lim.max_image_pixels, DataError), cfg.preprocess)
                if got != size:
                    raise DataError(f"{shown(n)}: comes out {got[0]}x{got[1]} after preprocess, the other images "
                                    f"{size[0]}x{size[1]}; set preprocess.resize and preprocess.crop")
        if used is not None:  # the calibration set is held in memory; evaluation streams in batches
            check_set_bytes(role, min(len(names), used), tuple(kept[0].shape), lim)
        return names, torch.stack(kept)
    finally:
        src.close()


def _calibration(calibration: str, cfg, lim, sample: int):
    """(the number of calibration images, a sample of them)."""
    from clcalib.data import TENSOR_SUFFIXES, DataError, load_tensor_file

    try:
        if Path(calibration).suffix in TENSOR_SUFFIXES:
            x = load_tensor_file(Path(calibration))
            return len(x), x[:sample]
        names, x = _images(calibration, "calibration", cfg, lim, sample, used=cfg.calib_size)
        return len(names), x
    except DataError as e:
        raise _Refused("calibration", "bad_data", _strip(str(e), calibration, "calibration")) from None


def _model_runs(net, program, arch: str, num_classes: int, x, count: int, cfg, worker_memory_bytes: int):
    """(seconds of a forward pass over two images, the worker's estimated peak memory)."""
    import time

    import torch

    from clcalib.memory_estimate import activation_bytes, estimate_peak

    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            y, largest, activations = activation_bytes(net, x[:2].float())
        probe_s = time.perf_counter() - t0
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if program is not None:
            from clcalib.graph.program import input_size

            want = input_size(program)
            if want is not None and tuple(want) != tuple(x.shape[1:]):
                c, h, w = want
                flags = (f"config.preprocess resize {h} and crop {h} (clcalib submit --resize {h} --crop {h})"
                         if h == w else f"images of {h}x{w} pixels (a tensor upload, .npy or .safetensors)")
                raise _Refused("calibration", "model_cannot_run",
                               f"the model takes images of {c}x{h}x{w}, the calibration data comes out as "
                               f"{'x'.join(map(str, x.shape[1:]))} with config.preprocess; send {flags}"
                               + ("" if want[0] == x.shape[1] else f", and {c}-channel images")) from None
        raise _Refused("calibration", "model_cannot_run",
                       f"{arch} cannot run on the calibration data of shape {tuple(x.shape[1:])} ({msg}); "
                       "check config.preprocess and the image channels") from None
    if tuple(y.shape) != (min(2, len(x)), num_classes):
        raise _Refused("model", "model_mismatch",
                       f"{arch} produced outputs of shape {tuple(y.shape)}, expected (N, {num_classes})")
    peak = estimate_peak(weight_bytes=sum(p.numel() * 4 for p in net.parameters()), image_bytes=x[0].numel() * 4,
                         images=min(count, cfg.calib_size), batch_size=cfg.batch_size,
                         largest_activation=largest, activations=activations)
    if worker_memory_bytes and peak["total"] > worker_memory_bytes:
        gib = {k: f"{v / 2**30:.1f}" for k, v in peak.items()}
        raise _Refused("calibration", "too_much_memory",
                       f"this job would need about {gib['total']} GiB in the worker (calibration set {gib['calibration set']}, "
                       f"cached activations {gib['unit caches']}, one batch {gib['batch']}, model and libraries "
                       f"{gib['base']} GiB) for images of {tuple(x.shape[1:])}; the worker's memory cap is "
                       f"{worker_memory_bytes / 2**30:.1f} GiB (CLCALIB_WORKER_MEMORY_BYTES). Use a smaller "
                       "config.preprocess.resize/crop, fewer images (config.calib_size) or config.batch_size")
    return probe_s, peak


def _bits_fit(model, is_program: bool, cfg, x) -> None:
    """config.layer_bits names sites the model has, and a budget or a target's ladder is not below
    the smallest model its choices allow: refused now, not after a worker measured for minutes."""
    from clcalib.config import Partition
    from clcalib.errors import ConfigError
    from clcalib.graph.partition import QuantModel, QuantSpec
    from clcalib.mixed.allocate import check_budget

    try:
        qm = QuantModel(model, QuantSpec.from_config(cfg), x[:2].float(), Partition.GRAPH if is_program else cfg.partition)
        check_budget(qm, cfg, x[:1].float())
    except ConfigError as e:
        raise _Refused("config", "bad_config", str(e)) from None


def _program_converts(program, cfg, x) -> None:
    """The graph converts (units, supported ops), and exports when asked, before a worker spends time."""
    from clcalib.config import ExportFormat, Partition
    from clcalib.errors import ExportError, ModelMismatchError
    from clcalib.graph.partition import QuantModel, QuantSpec

    try:
        qm = QuantModel(program, QuantSpec.from_config(cfg), x[:2].float(), Partition.GRAPH)
    except ModelMismatchError as e:
        raise _Refused("model", "unsupported_model", str(e)) from None
    except Exception as e:  # a form clcalib does not handle: a refusal by name, never a 500 that says retry
        raise _Refused("model", "unsupported_model", f"clcalib cannot convert this model ({_first_line(e)}); "
                       "this is a limit of clcalib, not of the file, and retrying will not help") from None
    if ExportFormat.ONNX not in cfg.export:
        return
    from clcalib.export.onnx_qdq import build_onnx

    try:  # every op has a translation: known now, not after calibration
        try:
            build_onnx(qm, (1, *x.shape[1:]), quantized=False)
        except ExportError:
            raise
        except Exception as e:  # an exporter bug on this form: the same refusal, named
            raise ExportError(f"the exporter failed on this model ({_first_line(e)})") from None
    except ExportError as e:
        raise _Refused("config", "unsupported_export",
                       f"the model cannot be exported to ONNX, which config.export asks: {e}. Leave "
                       "\"onnx\" out of config.export to calibrate it and download the checkpoint") from None


def _evaluation(evaluation: str, labels: str | None, cfg, lim, sample: int, num_classes: int, x) -> int:
    """The number of evaluation images."""
    from clcalib.data import DataError, class_names_to_indices, class_of, read_labels

    try:
        names_in_order = None
        if labels is not None:
            try:
                names_in_order = read_labels(labels)
            except DataError as e:
                raise _Refused("labels", "bad_data", _strip(str(e), f"labels file {labels}", "the labels file")) from None
        names, ex = _images(evaluation, "evaluation", cfg, lim, sample)
        try:
            index = class_names_to_indices(class_of(names), names_in_order)
        except DataError as e:
            raise _Refused("labels" if names_in_order is not None else "evaluation", "bad_data",
                           _strip(str(e), evaluation, "evaluation")) from None
        if max(index.values()) >= num_classes:
            raise DataError(f"class folders map to index {max(index.values())} but the model has "
                            f"num_classes={num_classes}")
        if tuple(ex.shape[1:]) != tuple(x.shape[1:]):
            raise DataError(f"images come out as {tuple(ex.shape[1:])}, the calibration images as "
                            f"{tuple(x.shape[1:])}; both use config.preprocess")
        return len(names)
    except DataError as e:
        raise _Refused("evaluation", "bad_data", _strip(str(e), evaluation, "evaluation")) from None


def _work_s(cfg, probe_s: float, probed: int, images: int) -> float:
    """The job's work in this check's seconds: a reconstruction iteration is about a forward and
    a backward pass (3 forwards) of one batch through the whole model (its units in turn), plus
    the passes over the calibration set that cache inputs and set ranges. The API turns it into
    an estimate with the ratio finished jobs measured (``Store.speed_factor``)."""
    per_image = probe_s / max(probed, 1)
    iters = cfg.iters if cfg.method.reconstructs else 0
    return round(per_image * (3 * cfg.batch_size * iters + 4 * images), 4)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def _header(src, name: str, max_pixels: int, DataError) -> tuple[int, int]:
    """(width, height) from the image's header, refused when unreadable or over the pixel cap."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(src.read(name))) as im:
            w, h = im.size
    except Exception as e:
        raise DataError(f"{name}: not a readable image ({e})") from None
    if w * h > max_pixels:
        raise DataError(f"{name}: {w}x{h} pixels, more than the cap of {max_pixels}")
    return w, h


def _strip(msg: str, path: str, role: str) -> str:
    """Messages name the upload by its role, not by the server's storage path."""
    return msg.replace(str(path), role)


__all__ = ["check_job", "list_archs", "warm_sandbox_child"]
