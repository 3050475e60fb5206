"""The one calibration config. The CLI flags, the service's ``config`` JSON and report.json
all use these field names; the service embeds this model unchanged."""

from __future__ import annotations

import types
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator


class Method(str, Enum):
    MINMAX = "minmax"  # min/max ranges, nearest rounding, no reconstruction
    MSE = "mse"  # MSE-searched ranges, nearest rounding, no reconstruction
    ADAROUND = "adaround"  # layer-wise reconstruction
    BRECQ = "brecq"  # block-wise reconstruction
    QDROP = "qdrop"  # block-wise, block input randomly mixes FP and quantized activations
    PDQUANT = "pdquant"  # qdrop + prediction-difference loss through the FP tail

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self]

    @property
    def reconstructs(self) -> bool:
        return self.spec.granularity is not Granularity.NONE


class Granularity(str, Enum):
    NONE = "none"  # no reconstruction: ranges and nearest rounding only
    LAYER = "layer"  # each Conv/Linear reconstructed on its own (inside its unit)
    UNIT = "unit"  # each reconstruction unit (residual block or single layer) as a whole


@dataclass(frozen=True)
class MethodSpec:
    """What a method does; the engine reads these, never the method's name."""

    range_search: bool  # initial ranges by the Lp search (False: plain min/max)
    granularity: Granularity
    drops_input: bool = False  # QDrop: the unit's input randomly mixes FP and quantized values
    prediction_difference: bool = False  # PD-Quant's KL term through the FP rest of the network


METHODS: dict[Method, MethodSpec] = {
    Method.MINMAX: MethodSpec(range_search=False, granularity=Granularity.NONE),
    Method.MSE: MethodSpec(range_search=True, granularity=Granularity.NONE),
    Method.ADAROUND: MethodSpec(range_search=True, granularity=Granularity.LAYER),
    Method.BRECQ: MethodSpec(range_search=True, granularity=Granularity.UNIT),
    Method.QDROP: MethodSpec(range_search=True, granularity=Granularity.UNIT, drops_input=True),
    Method.PDQUANT: MethodSpec(range_search=True, granularity=Granularity.UNIT, drops_input=True,
                               prediction_difference=True),
}


class ActPlacement(str, Enum):
    # BRECQ/QDrop: a conv feeding a residual add keeps a float output (the add is FP)
    BLOCK = "block"
    # also quantize those conv outputs: every conv/linear output is integer, as INT8 engines
    # (ONNX Runtime's QLinearConv/QLinearAdd, TensorRT) need to run the whole block in integers
    EVERY_LAYER = "every_layer"


class Partition(str, Enum):
    # registry architectures by their modules (bit-identical with earlier releases), others by graph
    AUTO = "auto"
    GRAPH = "graph"  # torch.export graph: units found from branch-and-merge regions (any model)
    MODULES = "modules"  # the registered block types and module order (the 7 registry architectures)


class ExportFormat(str, Enum):
    ONNX = "onnx"  # model.onnx in QDQ form, checked in ONNX Runtime in the same run


# the runtimes model.onnx can be written for; what each means: clcalib/export/profiles.py
ExportTarget = Literal["onnxruntime", "onnxruntime-vnni", "openvino", "tensorrt", "reference"]
# names configs and checkpoints written before still carry, and the target each now is
RENAMED_TARGETS = {"onnxruntime-avx2": "onnxruntime"}  # its layout, exact on every CPU, became the default


def current_target(name: str) -> str:
    return RENAMED_TARGETS.get(name, name) if isinstance(name, str) else name


MIN_BITS, MAX_BITS = 2, 8  # the bit widths clcalib calibrates, stores and exports


class Strict(BaseModel):
    # allow_inf_nan=False: NaN/Infinity (which JSON parsers accept) are refused where they come in
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite_float(v) -> float:
    try:
        return float(v)
    except OverflowError:  # an integer of hundreds of digits
        raise ValueError(f"{str(v)[:20]}... is too large for a float") from None


class Preprocess(Strict):
    """How images become tensors. Defaults are the ImageNet recipe; images are converted to RGB."""

    resize: int | None = Field(256, ge=1, le=4096, description="shorter side resized to this; null: no resize")
    crop: int | None = Field(224, ge=1, le=4096, description="center crop size; null: no crop")
    mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="per-channel mean subtracted "
                                              "after scaling pixels to [0, 1]; one value or three")
    std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="per-channel divisor after "
                                             "the mean; one value or three")

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _one_or_three(cls, v):
        # anything but a number (a list, an object, a bool) is left to the tuple's own validation,
        # which names it; float() here would raise TypeError/OverflowError, which pydantic passes on
        if _is_number(v):
            return (_finite_float(v),) * 3
        if isinstance(v, (list, tuple)) and len(v) == 1 and _is_number(v[0]):
            return (_finite_float(v[0]),) * 3
        return v

    @field_validator("std")
    @classmethod
    def _positive(cls, v):
        if any(s <= 0 for s in v):
            raise ValueError(f"std must be positive on every channel, got {v}")
        import numpy as np

        # images are normalised in float32: a std that is 0 or infinite there divides by 0 / gives 0
        with np.errstate(over="ignore", divide="ignore"):
            f32 = [np.float32(s) for s in v]
            bad = any(not (np.isfinite(f) and f > 0 and np.isfinite(np.float32(1.0) / f)) for f in f32)
        if bad:
            raise ValueError(f"std must be representable in float32 (about 1e-38 to 3e38), got {v}")
        return v


DEFAULT_CL_EVERY = 8  # the tail on every 8th iteration, held between (docs/cl_calib.md)


class ClCalib(Strict):
    """CL-Calib: contrastive term added to each unit's reconstruction loss."""

    enabled: bool = Field(False, description="add the contrastive term to each unit's loss; measured to help with "
                          "2-bit activations (W4A2, W2A2: +0.3 to +3.4 points over 5 draws of 128 or 1024 images), "
                          "not with 4-bit ones, at 1.2-1.3x qdrop's time on the CPU (docs/cl_calib.md)")
    # the defaults are the best measured form (relational, lambda 10, the tail every 8th iteration with
    # its gradient held between; docs/cl_calib.md): what --cl-calib, enabled: true and the web form's
    # checkbox get. Every iteration: every 1. The old rows' form: critic nce, lambda 0.1, every 1
    lambda_: float = Field(10.0, alias="lambda", ge=0.0, le=100.0, description="weight of L_CL")
    # the critic divides by tau: near 0 its logits overflow float32 (5e-324 ran to a non-finite model)
    tau: float = Field(0.5, ge=0.01, le=10.0, description="critic temperature")
    mapping: Literal["fp_tail", "pool", "flatten"] = "fp_tail"
    tail_end: Literal["features", "logits"] = Field(
        "logits", description="for mapping=fp_tail: where the frozen FP remainder stops"
    )
    # the tail's forward and backward per iteration is CL's cost; a tail through a few units is
    # a fraction of it and kept most of the gain at mobilenet_v2 W4A2 (docs/cl_calib.md)
    tail_units: int | None = Field(
        None, ge=1, le=100_000,
        description="for mapping=fp_tail: the FP remainder through the next n units only, its output "
        "average-pooled (cheaper than the whole remainder; tail_end then does not apply); null: to tail_end",
    )
    # relational: KL between the FP and the quantized similarity profiles over the FP keys; 0 at
    # z_q = z_f, unlike nce/infonce (kept to reproduce the earlier tables). Its gradient is ~20x
    # smaller than nce's at the same lambda, hence lambda 10 (docs/cl_calib.md)
    critic: Literal["nce", "infonce", "relational"] = "relational"
    # batch: the nce critic with the whole bank (N = M - 1 negatives) pushes z_q away from z_f
    # (resnet18 W2A4 top-1 -4.9 points in our probe); with batch negatives it does not
    negatives: Literal["batch", "bank"] = "batch"
    num_negatives: int | None = Field(None, ge=1, le=65536, description="negatives per anchor; null: all")
    symmetric: bool = False
    # the fp_tail's forward and backward is CL's cost (docs/cl_calib.md): skipping iterations makes
    # it cheaper; in pulses (no hold) every 8 lost the gain at mobilenet_v2 W4A2 (-3.6 points
    # instead of +2.6), held between turns it kept it (+3.4)
    every: int = Field(
        DEFAULT_CL_EVERY, ge=1, le=1000,
        description="the term (and its fp_tail pass) on every k-th iteration only: with hold (the default), its "
        "gradient held between turns (the every-iteration form's gain at 1.2-1.3x qdrop's time on the CPU, against "
        "2-3x); with hold false, weighted k times in pulses (lost the gain; docs/cl_calib.md); 1: every iteration",
    )
    # every: k alone sends the term in pulses of k * lambda; hold reuses the gradient of the last
    # turn on the k - 1 iterations between, at lambda: a steady pull for 1/k of the tail's cost
    hold: bool = Field(
        True,
        description="with every = k > 1: the term's gradient from its last turn is added again on the k - 1 "
        "iterations between, each weighted lambda (a steady pull instead of pulses); left out or null: true when "
        "every > 1, false with every 1",
    )
    rec_weight: float = Field(
        1.0, ge=0.0, le=1.0, description="weight of the reconstruction MSE; 0 keeps only L_CL"
    )

    @model_validator(mode="before")
    @classmethod
    def _hold_follows_every(cls, data):
        # hold left out: held when the term skips iterations, so {"every": 1} alone is the
        # every-iteration form and {"every": 8} the held one; hold false asks for the pulses
        if isinstance(data, dict) and data.get("hold") is None:
            try:
                every = int(data.get("every", DEFAULT_CL_EVERY))
            except (TypeError, ValueError):
                return data  # every's own error says what is wrong
            data = {**data, "hold": every > 1}
        return data

    @model_validator(mode="after")
    def _settings_fit_together(self) -> ClCalib:
        if self.hold and self.every == 1:
            raise ValueError("hold keeps the term's gradient between its turns, and with every = 1 it comes on "
                             "every iteration: set every to k > 1 (e.g. 8) or hold false")
        if self.tail_units is not None and self.mapping != "fp_tail":
            raise ValueError(f"tail_units shortens the fp_tail mapping; with mapping {self.mapping!r} there is "
                             "no tail: set mapping 'fp_tail' or leave tail_units null")
        return self


class PdQuant(Strict):
    """PD-Quant's prediction-difference loss (used when method = pdquant)."""

    # PD-Quant's recipe is rec + round + KL / lamb_r with lamb_r = 0.1; the engine's
    # reconstruction MSE is that regulariser (weight 1), so KL gets 1 / 0.1 = 10
    pd_weight: float = Field(10.0, ge=0.0, le=100.0, description="weight of the KL prediction-difference term (1/lamb_r of PD-Quant)")
    temperature: float | None = Field(
        None, ge=0.01, le=100.0,  # the KL divides the logits by it: near 0 they overflow (1e-300 did)
        description="KL temperature; null: 4, or 1 for MobileNet-like nets (PD-Quant's scripts)"
    )
    reg_weight: float = Field(
        0.0, ge=0.0, le=100.0, description="extra weight of the block-output regulariser, on top of the reconstruction MSE that already is it"
    )


def _bit_choices(v: tuple[int, ...]) -> tuple[int, ...]:
    if any(not MIN_BITS <= b <= MAX_BITS for b in v) or len(set(v)) != len(v):
        raise ValueError(f"bit choices must be distinct widths from {MIN_BITS} to {MAX_BITS}, got {list(v)}")
    return tuple(sorted(v))


MAX_BETA = 1000.0  # AdaRound's beta; its gradient beta * |2h-1|^(beta-1) is NaN far above
MAX_LAYER_BITS = 4096  # per-layer entries a config may hold (a model's layers and activation sites)
BitChoices = tuple[int, ...]


class Budget(Strict):
    """Mixed precision under a size budget: each layer's weight bits (with ``weight_mb`` or
    ``w_bits_avg``) and each activation quantizer's bits (with ``a_bits_avg``) chosen from the
    choices to minimise the measured sensitivity (docs/mixed_precision.md); what has no budget
    keeps w_bits / a_bits."""

    weight_mb: float | None = Field(None, gt=0, le=1e6, description="stored weight size in MB (10^6 bytes, the "
                                    "report's weight_bytes: codes, scales, zero points, biases)")
    w_bits_avg: float | None = Field(None, ge=MIN_BITS, le=MAX_BITS, description="average weight bits per "
                                     "parameter over the quantized layers (first/last included)")
    a_bits_avg: float | None = Field(None, ge=MIN_BITS, le=MAX_BITS, description="average activation bits, "
                                     "weighted by each quantized activation's size per image; null: a_bits everywhere")
    w_choices: BitChoices = Field((2, 3, 4, 8), min_length=1, max_length=7, description="weight bit widths a layer may get")
    a_choices: BitChoices = Field((2, 4, 8), min_length=1, max_length=7, description="activation bit widths (with a_bits_avg)")
    images: int = Field(256, ge=1, le=4096, description="calibration images the sensitivity is measured on")

    _choices = field_validator("w_choices", "a_choices")(lambda v: _bit_choices(v))


class Target(Strict):
    """Accuracy target: the smallest mixed-precision model (weights) whose top-1 on the
    evaluation set is within ``max_top1_drop`` points of the FP model's; needs an evaluation set."""

    max_top1_drop: float = Field(ge=0.0, le=100.0, description="allowed top-1 loss in points against FP")
    time_budget_s: float | None = Field(None, gt=0, le=30 * 86400, description="stop searching after this "
                                        "long and return the best model found so far; null: no limit")
    w_bits_avg: tuple[float, ...] = Field((2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0), min_length=1, max_length=12,
                                          description="the average weight bits of the candidates searched")
    w_choices: BitChoices = Field((2, 3, 4, 8), min_length=1, max_length=7, description="weight bit widths a layer may get")
    images: int = Field(256, ge=1, le=4096, description="calibration images the sensitivity is measured on")

    _choices = field_validator("w_choices")(lambda v: _bit_choices(v))

    @field_validator("w_bits_avg")
    @classmethod
    def _ladder(cls, v):
        if any(not MIN_BITS <= b <= MAX_BITS for b in v) or len(set(v)) != len(v):
            raise ValueError(f"candidate average weight bits must be distinct values from {MIN_BITS} to {MAX_BITS}")
        return tuple(sorted(v))


class CalibConfig(Strict):
    """Everything that decides a calibration result. Unknown keys are rejected."""

    method: Method = Field(Method.QDROP, description="minmax/mse: ranges only; adaround: layer-wise rounding; "
                           "brecq: block-wise; qdrop: block-wise with dropped activation quantization; "
                           "pdquant: qdrop + prediction difference")
    w_bits: int = Field(4, ge=MIN_BITS, le=MAX_BITS, description="weight bits")
    a_bits: int = Field(4, ge=MIN_BITS, le=MAX_BITS, description="activation bits")
    first_last_bits: int | None = Field(
        8, ge=MIN_BITS, le=MAX_BITS, description="bits of the first conv and last linear (and the last linear's input); null: same as the body"
    )
    w_symmetric: bool = Field(False, description="symmetric weight quantization (zero point fixed at the middle)")
    act_placement: ActPlacement = Field(
        ActPlacement.BLOCK,
        description="block: activation quantizers as BRECQ/QDrop (residual-branch outputs stay FP until the add); "
        "every_layer: also at the outputs that feed a residual add (for INT8 runtimes, see docs/deploy.md)",
    )
    partition: Partition = Field(
        Partition.AUTO,
        description="how units are found: graph (from the torch.export graph, any model), modules (registered "
        "block types), auto (modules for the registry architectures, graph otherwise)",
    )
    iters: int = Field(20000, ge=0, le=200000, description="optimization iterations per reconstruction unit")
    batch_size: int = Field(32, ge=1, le=4096, description="calibration images per reconstruction step")
    calib_size: int = Field(1024, ge=1, le=100000, description="calibration images used (a seeded random subset if more are given)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seeds batches and dropping (and the calibration draw while calib_seed is null)")
    calib_seed: int | None = Field(
        None, ge=0, le=2**31 - 1,
        description="the calibration draw: which calib_size images of a larger supplied set are used; null: seed",
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto: cuda when available")
    lr_round: float = Field(3e-3, gt=0, le=1.0, description="Adam lr of the AdaRound variables")
    lr_act: float = Field(4e-5, ge=0, le=1.0, description="Adam lr of activation step sizes (cosine decay to 0)")
    round_weight: float | None = Field(
        None, ge=0, le=100.0, description="AdaRound regulariser weight; null: 0.01, or 0.1 for MobileNet-like nets"
    )
    warmup: float = Field(0.2, ge=0.0, lt=1.0, description="fraction of iterations before the rounding regulariser starts")
    beta: tuple[float, float] = Field((20.0, 2.0), description="regulariser beta annealed from start to end")
    drop_prob: float = Field(0.5, ge=0.0, le=1.0, description="qdrop/pdquant: probability that an element is kept FP instead of quantized during reconstruction")
    drop_scope: Literal["input", "all"] = Field(
        "input",
        description="qdrop/pdquant: where quantization is dropped: the unit's input only, or also at every "
        "activation quantizer inside the unit, its output included (the official QDrop code)",
    )
    cache_placement: Literal["auto", "device", "host"] = Field(
        "auto",
        description="where each unit's cached inputs/outputs live during its reconstruction: auto (the device "
        "when they fit in its free memory, else host memory streamed per batch), device, or host; same result either way",
    )
    step_capture: Literal["auto", "off"] = Field(
        "auto",
        description="auto: on a CUDA device, each reconstruction step is captured once into a CUDA graph and "
        "replayed (not with host-memory caches or sampled CL negatives); off: every step runs eagerly",
    )
    act_range_p: float = Field(
        2.4, ge=1.0, le=4.0, description="Lp norm minimised by the activation range search (2.4 as BRECQ's and QDrop's code; 2: least squares)"
    )
    export: tuple[ExportFormat, ...] = Field(
        (), description='extra artifacts beside the checkpoint: ["onnx"] writes model.onnx (QDQ), checked in ONNX Runtime'
    )
    export_target: Annotated[ExportTarget, BeforeValidator(
        current_target, json_schema_input_type=Literal[get_args(ExportTarget) + tuple(RENAMED_TARGETS)])] = Field(
        "onnxruntime",
        description="the runtime model.onnx is written for (docs/deploy.md): onnxruntime (integer kernels, exact "
        "on every CPU), onnxruntime-vnni (faster 8-bit layers on x86 CPUs with VNNI and on ARM; wrong on x86 without "
        "VNNI), openvino and tensorrt (need w_symmetric), reference (exact float simulation of every bit width, slow)",
    )
    layer_bits: dict[str, int] = Field(
        default_factory=dict, max_length=MAX_LAYER_BITS,
        description="per-layer bits: a layer's name sets its weight bits, an activation quantizer's name "
        "(ending .out_quant / .in_quant) its bits; names as `clcalib inspect` lists them. Filled by budget and target",
    )
    budget: Budget | None = Field(None, description="mixed precision under a size budget (sets layer_bits)")
    target: Target | None = Field(None, description="the smallest model within an accuracy drop of FP (needs an "
                                  "evaluation set; sets layer_bits)")
    preprocess: Preprocess = Preprocess()
    cl_calib: ClCalib = ClCalib()
    pdquant: PdQuant = PdQuant()

    @model_validator(mode="after")
    def _consistent(self):
        if self.beta[0] < self.beta[1] or self.beta[1] < 1:
            raise ValueError(f"beta must anneal downwards and stay >= 1 (|2h-1|^(beta-1) is infinite at h=0.5 below 1), got {self.beta}")
        if self.beta[0] > MAX_BETA:  # beta * |2h-1|^(beta-1) overflows to inf * 0 = NaN in the gradient
            raise ValueError(f"beta must stay <= {MAX_BETA:g} (AdaRound anneals 20 to 2), got {self.beta}")
        if ExportFormat.ONNX in self.export:
            from clcalib.export.profiles import settings_problem

            if problem := settings_problem(self.export_target, self.w_symmetric):
                raise ValueError(problem)
        for name, bits in self.layer_bits.items():
            if not MIN_BITS <= bits <= MAX_BITS or not 0 < len(name) <= 512:
                raise ValueError(f"layer_bits[{name[:80]!r}]: bits must be from {MIN_BITS} to {MAX_BITS} and names "
                                 f"1 to 512 characters, got {bits}")
        if self.budget is not None and self.target is not None:
            raise ValueError("give a budget or a target, not both: the target searches over budgets itself")
        if self.budget is not None and self.budget.weight_mb is not None and self.budget.w_bits_avg is not None:
            raise ValueError("budget: give weight_mb or w_bits_avg, not both")
        if self.budget is not None and (self.budget.weight_mb, self.budget.w_bits_avg, self.budget.a_bits_avg) == (None,) * 3:
            raise ValueError("budget needs weight_mb or w_bits_avg (weights), a_bits_avg (activations), or both")
        if self.cl_calib.enabled and not self.method.reconstructs:
            raise ValueError(
                f"cl_calib needs a reconstruction method (adaround, brecq, qdrop, pdquant), got method={self.method.value}"
            )
        return self

    @property
    def calib_draw(self) -> int:
        """The seed that picks the calibration images (``calib_seed``, else ``seed``)."""
        return self.seed if self.calib_seed is None else self.calib_seed

    def summary(self) -> str:
        c = self.cl_calib
        every = "" if c.every == 1 else f", every {c.every}" + (" held" if c.hold else " in pulses")
        cl = f"+CL({c.critic}, lambda {c.lambda_:g}{every})" if c.enabled else ""
        return (f"{self.method.value}{cl} W{self.w_bits}A{self.a_bits} iters={self.iters} seed={self.seed} "
                f"calib_draw={self.calib_draw}")


def _capacity(model: type[BaseModel]) -> int:
    """The most keys and list values a valid instance of ``model`` can hold as JSON."""
    return sum(1 + _items(f.annotation) for f in model.model_fields.values())


def _items(tp) -> int:
    origin, args = get_origin(tp), get_args(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return _capacity(tp)
    if origin in (Union, types.UnionType):
        return max(_items(a) for a in args)
    if origin is dict:  # a bounded mapping (layer_bits): every entry a key and its value
        return MAX_LAYER_BITS * (1 + _items(args[1]))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:  # a variable tuple: of an enum, each value once
            n = len(args[0]) if isinstance(args[0], type) and issubclass(args[0], Enum) else 8
            return n * (1 + _items(args[0]))
        return sum(1 + _items(a) for a in args)
    return 0


# every field of every section set, every tuple full: no valid config holds more keys and values
MAX_CONFIG_ITEMS = _capacity(CalibConfig)


def count_items(data, stop: int) -> int:
    """Keys of objects and values of lists in parsed JSON, counted until past ``stop`` (a config
    with 60000 unknown keys costs ``stop`` steps here, not 60000 validation errors)."""
    n, todo = 0, [data]
    while todo and n <= stop:
        v = todo.pop()
        if isinstance(v, dict):
            n += len(v)
            todo.extend(v.values())
        elif isinstance(v, list):
            n += len(v)
            todo.extend(v)
    return n
