"""Export profiles: how a quantized model is written as ONNX QDQ for the runtime that will run it.

The same calibrated integers can be written so that a runtime's integer kernels take every
conv, linear and add end to end (fast), or as an exact float simulation of any bit width
(``reference``). Where they differ is one of these facts, each measured in
bench/RESULTS_export.md and docs/deploy.md, and held by tests/test_onnx_export.py:

- ``integer_ops``: runtimes fuse ``DequantizeLinear -> Conv/Gemm/Add -> QuantizeLinear`` into one
  integer kernel only when every input comes from a DequantizeLinear and the output goes
  straight into a QuantizeLinear. Block reconstruction (BRECQ/QDrop) leaves the residual
  branches' outputs, the residual sums and the image input in float; the integer profiles
  quantize them to 8 bits (asymmetric uint8, range = min/max over the calibration images, as
  ONNX Runtime's and NNCF's quantizers do). This is the only place a file departs from the
  calibrated model; the export's agreement check measures what it costs.
- ``activations``: below 8 bits the reference writes ``Q -> Clip(0, 2^bits - 1) -> DQ`` (exact);
  the integer Clip between Q and DQ stops every runtime's fusion, and int8 kernels run 4-bit
  codes no faster than 8-bit ones. Integer profiles write them as 8-bit codes over the same
  calibrated clamp range (``"8bit"``: ``widen_to_8bit``, a finer grid, exact clamp), and check
  the file against the model run the same way (``quant.switch.eight_bit_activations``).
  Dropping the Clip instead (codes saturating at 255 on the calibrated step) cost resnet18
  W4A4 0.4 points of top-1 where widening gained 0.8 (mse ranges, 1000 test images).
- ``signed_weights``: 8-bit weight codes as INT8 (symmetric weights: zero point 0), what
  OpenVINO's and VNNI CPUs' fast int8 kernels take. x86 CPUs without VNNI (Haswell to Skylake,
  AMD Zen 2/3) add two uint8 x int8 products in a saturating int16 (255 x 127 x 2 > 32767), so
  there such a file computes wrong sums (``u8s8``; onnx_check.int8_sums_saturate finds out on
  the checking host). Weights of 7 bits or fewer cannot overflow (|code| <= 64), and neither
  can INT8 activations (TensorRT's layout). The default, ``onnxruntime``, stores 8-bit weights
  as UINT8 (uint8 x uint8 kernels widen first): exact on every CPU, slower on VNNI ones for the
  8-bit layers, which ``onnxruntime-vnni`` keeps signed.
- ``packed_weights``: 2-4-bit weight codes stored as INT4 (half the file) in the reference; the
  runtimes' integer convs take only 8-bit weights, so integer profiles store them in INT8
  (packed INT4, resnet18 W4A8 ran 19 of 20 convs in float in ONNX Runtime 1.32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from clcalib.config import ExportTarget, current_target
from clcalib.errors import ExportError


@dataclass(frozen=True)
class Profile:
    name: str
    summary: str
    integer_ops: bool
    activations: str  # "calibrated": the calibrated bit widths (Clip); "8bit": widened to 8 bits
    signed_weights: bool
    packed_weights: bool
    runtime: str  # where the export is checked: "onnxruntime" or "openvino"
    symmetric_weights_only: bool = False  # the runtime's int8 kernels need zero point 0 in the weights
    symmetric_activations: bool = False  # int8 activations with zero point 0 (TensorRT)

    @property
    def u8s8(self) -> bool:
        """8-bit signed weights against uint8 activations: sums that saturate on x86 CPUs without VNNI."""
        return self.integer_ops and self.signed_weights and not self.symmetric_activations


PROFILES = {
    p.name: p
    for p in (
        Profile("onnxruntime", "integer kernels in ONNX Runtime (QLinearConv/QLinearAdd), exact on every CPU: "
                "8-bit weights unsigned, narrower ones signed",
                integer_ops=True, activations="8bit", signed_weights=False, packed_weights=False,
                runtime="onnxruntime"),
        Profile("onnxruntime-vnni", "the onnxruntime layout with 8-bit weights signed: faster 8-bit layers on x86 "
                "CPUs with VNNI (Intel Cascade Lake and later, AMD Zen 4 and later) and on ARM; WRONG sums on x86 "
                "CPUs without VNNI (they saturate), so deploy it only on the former",
                integer_ops=True, activations="8bit", signed_weights=True, packed_weights=False,
                runtime="onnxruntime"),
        Profile("openvino", "integer kernels in OpenVINO (the onnxruntime-vnni layout; OpenVINO takes int8 weights "
                "only with zero point 0: needs w_symmetric: true), checked in OpenVINO and ONNX Runtime",
                integer_ops=True, activations="8bit", signed_weights=True, packed_weights=False,
                runtime="openvino", symmetric_weights_only=True),
        Profile("tensorrt", "TensorRT's explicit quantization: int8 weights and activations, both with zero point 0 "
                "(needs w_symmetric: true; activation ranges re-expressed symmetric, a ReLU kept before each "
                "quantizer that folded one); checked in ONNX Runtime here, in TensorRT by bench/gpu_tensorrt.py",
                integer_ops=True, activations="8bit", signed_weights=True, packed_weights=False,
                runtime="onnxruntime", symmetric_weights_only=True, symmetric_activations=True),
        Profile("reference", "exact simulation of every bit width (2-4-bit weights packed in INT4, narrow "
                "activation codes clipped); float kernels between the Q/DQ pairs, slower than FP32",
                integer_ops=False, activations="calibrated", signed_weights=False, packed_weights=True,
                runtime="onnxruntime"),
    )
}
DEFAULT = "onnxruntime"
assert set(PROFILES) == set(get_args(ExportTarget)), "config.ExportTarget names the profiles"


def profile(name: str) -> Profile:
    """The profile named ``name`` (or by its old name: config.RENAMED_TARGETS)."""
    try:
        return PROFILES[current_target(name)]
    except KeyError:
        raise ExportError(f"export target {name!r} is not known; choose one of {', '.join(PROFILES)}") from None


def widens_activations(target: str | None, config: dict) -> bool:
    """Whether a file for ``target`` runs some of the calibrated activations at more bits (those
    below 8 as 8-bit codes over their calibrated ranges): its agreement is then with the torch
    model run that way, and its top-1 can differ from the calibrated model's."""
    if target is None or profile(target).activations != "8bit":
        return False
    acts = [b for n, b in (config.get("layer_bits") or {}).items() if n.endswith((".out_quant", ".in_quant"))]
    return any(isinstance(b, int) and b < 8 for b in [config.get("a_bits", 8), *acts])


def settings_problem(name: str, w_symmetric: bool) -> str | None:
    """Why a calibration with these settings cannot be written for target ``name`` (None: it can)."""
    if profile(name).symmetric_weights_only and not w_symmetric:
        return (f"export target {name}: its int8 kernels need symmetric weights (zero point 0); set "
                "w_symmetric: true (--w-symmetric), or choose export_target onnxruntime")
    return None


def check_target(name: str, w_symmetric: bool) -> Profile:
    """The profile ``name``, refused before calibration when its runtime is not installed or the
    calibration settings cannot be written for it."""
    p = profile(name)
    if problem := settings_problem(name, w_symmetric):
        raise ExportError(problem)
    require_runtime(p.runtime)
    return p


def require_runtime(runtime: str) -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs the onnx and onnxruntime packages: pip install 'clcalib[onnx]'") from None
    if runtime == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise ExportError("export target openvino is checked in OpenVINO, which is not installed: "
                              "pip install 'clcalib[openvino]'") from None
