"""Run an exported ONNX file in ONNX Runtime (CPU) and hold it against the torch model's logits
on the same images: what a user's runtime gives must be what the report says."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from clcalib.errors import ExportError
from clcalib.export.profiles import DEFAULT, profile
from clcalib.metrics import agreement, top1

# An export whose top-1 agrees with the torch model's on fewer images than this (%) fails. Not
# 100: ONNX Runtime's conv kernels sum in another order than torch's, so a value on a rounding
# boundary of an activation quantizer can land one step away, and at 2-3-bit activations such
# steps cascade (resnet18 W2A3 without reconstruction: 98.7-99.3 % agreement; W8A8 and W4A4
# after qdrop: 99.98-100 %, bench/results/onnx_export.jsonl). A wrong export falls far below:
# an eighth of one layer's channel scales off by 1.5x gave 86-90 % (tests/test_onnx_export.py).
MIN_AGREEMENT = 97.0


def require_onnx() -> None:
    """Fail now, with the install command, if the ONNX packages are missing."""
    from clcalib.export.profiles import require_runtime

    require_runtime("onnxruntime")


def export_checked(model, path: str | Path, input_shape: tuple[int, ...], images: Tensor | Iterable[Tensor],
                   labels: Tensor | None = None, device: str | torch.device = "cpu",
                   threads: int | None = None, target: str = DEFAULT,
                   range_images: Tensor | None = None,
                   min_agreement: float | None = MIN_AGREEMENT) -> tuple[dict, Tensor]:
    """Export ``model`` to ``path`` for the runtime ``target`` (export/profiles.py) and check it
    first, in ONNX Runtime and, for target openvino, in OpenVINO too: the file appears only if
    it passes, a failing one is removed. One pass over ``images`` (an evaluation set streams
    and is decoded once) gives the torch model's logits (on ``device``) and each runtime's.
    ``range_images``: calibration images, for the integer profiles' 8-bit ranges. Returns
    (``onnx_bytes``, ``export_target`` and check_logits's fields per runtime, the torch logits:
    the calibrated model's, also when the file runs its low-bit activations at 8 bits)."""
    from clcalib.atomic import atomic_path
    from clcalib.export.onnx_qdq import build_onnx
    from clcalib.metrics import predict
    from clcalib.quant.switch import eight_bit_activations

    prof = profile(target)
    # this CPU would run the file's int8 sums wrongly (8-bit signed weights on x86 without VNNI):
    # check what the file computes on ONNX Runtime's float kernels, and say the kernels here are
    # wrong (OpenVINO's too: its agreement is reported, not required)
    unfused = prof.u8s8 and any(layer.wq.bits == 8 for layer in model.layers()) and int8_sums_saturate()
    with atomic_path(Path(path)) as tmp:  # one temporary file, renamed only once the check passed
        tmp.write_bytes(build_onnx(model, tuple(input_shape), target=target, range_images=range_images).SerializeToString())
        runners = {"onnx": OnnxRunner(tmp, threads, config=UNFUSED if unfused else None)}
        if prof.runtime == "openvino":
            from clcalib.export.openvino_check import OpenVinoRunner

            runners["openvino"] = OpenVinoRunner(tmp, threads)
        torch_logits, file_logits = [], []
        got: dict[str, list[Tensor]] = {k: [] for k in runners}
        for x in _batches(images, BATCH):
            torch_logits.append(predict(model, [x], device=device))
            if prof.activations == "8bit":  # the model the file is: low-bit activations widened to 8 bits
                with eight_bit_activations(model):
                    file_logits.append(predict(model, [x], device=device))
            for k, run in runners.items():
                got[k].append(run(x))
        torch_logits = torch.cat(torch_logits)
        ref = torch.cat(file_logits) if file_logits else torch_logits
        out = {"onnx_bytes": tmp.stat().st_size, "export_target": prof.name,
               "onnx_8bit_weights": "int8" if prof.signed_weights else "uint8"}  # the layout, whatever its name
        if unfused:
            out["onnx_check_kernels"] = "float"
            out["onnx_check_note"] = saturation_note(prof.name, prof.runtime)
        for k in runners:
            required = None if unfused and k == "openvino" else min_agreement
            out.update(check_logits(tmp, ref, torch.cat(got[k]), labels, runtime=k, min_agreement=required))
    return out, torch_logits


def session(path: str | Path | bytes, threads: int | None = None, config: dict[str, str] | None = None):
    """An ONNX Runtime CPU session of the file at ``path`` (or a serialized model); ``config``:
    session config entries (e.g. UNFUSED)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("checking an ONNX export needs onnxruntime: pip install 'clcalib[onnx]'") from None
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3  # warnings about hardware-specific optimisations are not the user's concern
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"{'the model' if isinstance(path, bytes) else path}: ONNX Runtime cannot load the file ({str(e).splitlines()[0][:300]})") from None


BATCH = 250  # images per ONNX Runtime call


def _batches(images: Tensor | Iterable[Tensor], batch: int) -> Iterable[Tensor]:
    return images.split(batch) if isinstance(images, Tensor) else images


# ONNX Runtime without its QDQ fusion: DequantizeLinear, float Conv, QuantizeLinear, as written
UNFUSED = {"session.disable_quant_qdq": "1"}


def saturation_note(target: str, runtime: str) -> str:
    """What the report says when this CPU's int8 kernels cannot run a u8s8 file's sums right."""
    why = ("this CPU is x86 without VNNI, whose uint8 x int8 kernels add products in a saturating int16: target "
           f"{target}'s 8-bit signed weights give wrong sums here, so the file was checked on ONNX Runtime's float "
           "kernels (its numbers are right; integer kernels run it right on x86 CPUs with VNNI and on ARM)")
    if runtime == "openvino":
        return (why + ". OpenVINO's int8 kernels on this CPU saturate too: its agreement here is reported, not "
                "required. For CPUs like this one, keep every weight at 7 bits or fewer (first_last_bits 7, w_bits "
                "at most 7: nothing saturates, docs/deploy.md) or export with target onnxruntime for ONNX Runtime")
    return (why + ". Do not deploy it on CPUs like this one: export with target onnxruntime (exact on every CPU), "
            "or keep every weight at 7 bits or fewer (first_last_bits 7, w_bits at most 7)")


@cache
def int8_sums_saturate() -> bool:
    """Whether this host's ONNX Runtime adds uint8 x int8 products in a saturating int16 (x86
    without VNNI), found out by running it: one QLinearConv whose exact sum, 16 x 255 x 127,
    comes out near half when pairs of products saturate at 32767."""
    import numpy as np
    from onnx import TensorProto as T
    from onnx import helper as h

    k = 16
    inits = [h.make_tensor("xs", T.FLOAT, [], [1.0]), h.make_tensor("xz", T.UINT8, [], [0]),
             h.make_tensor("w", T.INT8, [1, k, 1, 1], [127] * k), h.make_tensor("ws", T.FLOAT, [], [1.0]),
             h.make_tensor("wz", T.INT8, [], [0]), h.make_tensor("ys", T.FLOAT, [], [4096.0]),
             h.make_tensor("yz", T.UINT8, [], [0])]
    graph = h.make_graph([h.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])], "probe",
                         [h.make_tensor_value_info("x", T.UINT8, [1, k, 4, 4])],
                         [h.make_tensor_value_info("y", T.UINT8, [1, 1, 4, 4])], inits)
    probe = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    probe.ir_version = 10
    y = session(probe.SerializeToString(), threads=1).run(None, {"x": np.full((1, k, 4, 4), 255, np.uint8)})[0]
    return int(y.ravel()[0]) < 100  # exact: round(16 x 255 x 127 / 4096) = 127; saturated: 64


class OnnxRunner:
    """Logits (float32, CPU) of the ONNX model at ``path`` for one batch of images; ``config``:
    session config entries (UNFUSED: no integer kernels)."""

    def __init__(self, path: str | Path, threads: int | None = None, config: dict[str, str] | None = None):
        self.session = session(path, threads, config)
        self.name = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.session.run(None, {self.name: x.detach().cpu().float().numpy()})[0])


def onnx_predict(path: str | Path, images: Tensor | Iterable[Tensor], batch: int = BATCH,
                 threads: int | None = None) -> Tensor:
    """Logits of the ONNX model at ``path`` for ``images`` (N x C x H x W, or an iterable of such
    batches), float32 on CPU."""
    run = OnnxRunner(path, threads)
    return torch.cat([run(x) for x in _batches(images, batch)])


def check_onnx(path: str | Path, torch_logits: Tensor, images: Tensor | Iterable[Tensor],
               labels: Tensor | None = None, threads: int | None = None) -> dict:
    """``onnx_top1`` (with labels), ``onnx_top1_agreement`` with the torch model and
    ``onnx_max_abs_logit_diff``; raises ExportError below MIN_AGREEMENT."""
    return check_logits(path, torch_logits, onnx_predict(path, images, threads=threads), labels)


RUNTIMES = {"onnx": "ONNX Runtime", "openvino": "OpenVINO"}  # field prefix -> the runtime's name


def check_logits(path: str | Path, torch_logits: Tensor, ort_logits: Tensor, labels: Tensor | None = None,
                 runtime: str = "onnx", min_agreement: float | None = MIN_AGREEMENT) -> dict:
    """check_onnx's fields (prefixed ``runtime``: onnx, openvino) from both models' logits on the
    same images (``path`` names the file in the error). ``min_agreement`` None: reported, not
    enforced (random inputs, which saturate an integer file's calibrated 8-bit ranges)."""
    ref, name = torch_logits.detach().cpu().float(), RUNTIMES[runtime]
    if ort_logits.shape != ref.shape:
        raise ExportError(f"{path}: {name} gives logits of shape {tuple(ort_logits.shape)}, "
                          f"the torch model {tuple(ref.shape)}")
    out = {
        f"{runtime}_top1": top1(ort_logits, labels) if labels is not None else None,
        f"{runtime}_top1_agreement": agreement(ref, ort_logits),
        f"{runtime}_max_abs_logit_diff": float((ref - ort_logits).abs().max()),
        f"{runtime}_checked_images": len(ort_logits),
    }
    if min_agreement is not None and not out[f"{runtime}_top1_agreement"] >= min_agreement:
        raise ExportError(
            f"{path}: {name}'s top-1 agrees with the torch model's on only {out[f'{runtime}_top1_agreement']:.2f} % "
            f"of {len(ort_logits)} images (at least {min_agreement} % expected; max |logit diff| "
            f"{out[f'{runtime}_max_abs_logit_diff']:.3g}); the export is wrong, please report it")
    return out
