"""The quantized checkpoint: one safetensors file with integer weights (bit-packed), per-channel
scales and zero points, activation quantizer parameters, float biases and a JSON header.

``load_quantized`` rebuilds the model from the registry and the header, or, for a model that
came through the graph path, from the torch.export program stored in the file (tensor
``graph.pt2.zlib``: the program with its Conv/Linear weights zeroed and no sample inputs,
zlib-compressed, read back through the same checks as an upload). It runs the same dequantize
code as the calibrated model, so its outputs are bit-identical on the same device.
"""

from __future__ import annotations

import json
import platform
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from clcalib.config import MAX_BITS, MIN_BITS, CalibConfig, Partition
from clcalib.errors import ExportError
from clcalib.graph.partition import QuantModel, QuantSpec
from clcalib.graph.registry import build_model
from clcalib.quant.activation import ActQuantizer
from clcalib.quant.layer import QuantLayer
from clcalib.quant.sites import layer_bytes
from clcalib.quant.weight import WState
from clcalib.recon.resume import atomic_save

FORMAT = "clcalib.quantized/1"
GRAPH_TENSOR = "graph.pt2.zlib"
MAX_GRAPH_BYTES = 1 << 30  # the stored program, unpacked (its layer weights are zeros)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2^bits) -> a dense uint8 bit stream (bits per value, MSB first)."""
    codes = q.detach().cpu().reshape(-1).to(torch.uint8).numpy()
    if bits == 8:
        return torch.from_numpy(codes.copy())
    planes = np.unpackbits(codes[:, None], axis=1)[:, 8 - bits :]
    return torch.from_numpy(np.packbits(planes.reshape(-1)))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    data = packed.numpy()
    if bits == 8:
        return torch.from_numpy(data[:count].astype(np.float32))
    planes = np.unpackbits(data)[: count * bits].reshape(count, bits)
    full = np.zeros((count, 8), np.uint8)
    full[:, 8 - bits :] = planes
    return torch.from_numpy(np.packbits(full, axis=1).reshape(-1).astype(np.float32))


@dataclass
class ModelSize:
    """Bytes of the checkpoint's layer tensors against the same layers in FP32 (the job data
    folder is ``jobs.storage.Storage``)."""

    quantized_bytes: int
    fp32_bytes: int

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / max(self.quantized_bytes, 1)


def _tensors(qm: QuantModel) -> tuple[dict[str, torch.Tensor], dict[str, list], ModelSize]:
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, list] = {}
    qbytes = fbytes = 0
    for name, m in qm.named_modules():
        if isinstance(m, QuantLayer):
            if m.wq.state is not WState.INT:
                raise ExportError(f"{name}: weights are not in integer state ({m.wq.state.value}); calibrate first")
            packed = pack_bits(m.wq.q, m.wq.bits)
            tensors[f"{name}.qweight"] = packed
            tensors[f"{name}.w_scale"] = m.wq.scale.float()
            tensors[f"{name}.w_zero"] = m.wq.zero.to(torch.uint8)
            tensors[f"{name}.bias"] = m.bias.float()
            layers[name] = [m.wq.bits, list(m.weight.shape)]
            qbytes += layer_bytes(m, m.wq.bits)
            fbytes += 4 * (m.weight.numel() + m.bias.numel())
        elif isinstance(m, ActQuantizer) and m.initialized:
            tensors[f"{name}.a_scale"] = m.scale.detach().float().reshape(())
            tensors[f"{name}.a_zero"] = m.zero.float().reshape(())
    return tensors, layers, ModelSize(qbytes, fbytes)


def save_quantized(qm: QuantModel, path: str | Path, *, arch: str, num_classes: int, config: CalibConfig,
                   input_shape: tuple[int, ...], extra: dict | None = None) -> ModelSize:
    """Write the checkpoint atomically. ``extra`` (metrics, hashes, ...) goes into the header."""
    tensors, layers, storage = _tensors(qm)
    graph = {}
    if qm.program is not None:
        raw = _program_bytes(qm.program)
        tensors[GRAPH_TENSOR] = torch.frombuffer(bytearray(zlib.compress(raw, 6)), dtype=torch.uint8)
        graph = {"graph": {"bytes": len(raw)}}
    header = {
        "format": FORMAT,
        "arch": arch,
        "num_classes": num_classes,
        "input_shape": list(input_shape),
        "preprocess": config.preprocess.model_dump(mode="json"),
        "method": config.method.value,
        "config": config.model_dump(mode="json", by_alias=True),
        "seed": config.seed,
        "layers": layers,
        "versions": versions(),
        "storage": {"quantized_bytes": storage.quantized_bytes, "fp32_bytes": storage.fp32_bytes},
        **graph,
        **(extra or {}),
    }
    atomic_save(tensors, Path(path), {"clcalib": json.dumps(header)})
    return storage


def _program_bytes(ep) -> bytes:
    """The program without what the checkpoint holds better or must not leak: Conv/Linear
    weights and biases (zeros; the quantized ones are loaded over them) and the sample inputs
    (the user's calibration images)."""
    from torch import fx

    from clcalib.graph.program import program_to_bytes

    params = ep.graph_signature.inputs_to_parameters
    layer_ops = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
    names = {params[a.name] for n in ep.graph.nodes if n.op == "call_function" and n.target in layer_ops
             for a in n.args[1:3] if isinstance(a, fx.Node) and a.name in params}
    state = ep.state_dict
    saved, example = {k: state[k] for k in names}, ep.example_inputs
    try:
        for k in names:
            z = torch.zeros_like(saved[k])
            state[k] = torch.nn.Parameter(z, saved[k].requires_grad) if isinstance(saved[k], torch.nn.Parameter) else z
        ep.example_inputs = None
        return program_to_bytes(ep)
    finally:
        state.update(saved)
        ep.example_inputs = example


def _stored_program(path, header: dict):
    from clcalib.graph.program import BadProgram, program_from_bytes

    size = header["graph"].get("bytes") if isinstance(header.get("graph"), dict) else None
    if not (isinstance(size, int) and 0 < size <= MAX_GRAPH_BYTES):
        raise ExportError(f"{path}: the header's graph size is missing or out of range; the file is damaged")
    with safe_open(str(path), "pt") as f:
        packed = f.get_tensor(GRAPH_TENSOR).numpy().tobytes()
    d = zlib.decompressobj()
    try:
        raw = d.decompress(packed, size + 1)  # bounded: a forged size cannot inflate without limit
    except zlib.error as e:
        raise ExportError(f"{path}: the stored graph does not decompress ({e}); the file is damaged") from None
    if len(raw) != size:
        raise ExportError(f"{path}: the stored graph is {len(raw)} bytes, the header says {size}; the file is damaged")
    try:
        return program_from_bytes(raw, "the stored graph", decomposed=True)
    except BadProgram as e:
        raise ExportError(f"{path}: {e}") from None


def versions() -> dict[str, str]:
    import torchvision

    from clcalib import __version__

    return {"clcalib": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}


def read_header(path: str | Path) -> dict:
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ExportError(f"{path}: not a readable safetensors file ({e})") from None
    if "clcalib" not in meta:
        raise ExportError(f"{path}: a safetensors file without a clcalib header; not a quantized checkpoint")
    try:
        header = json.loads(meta["clcalib"])
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: the clcalib header is not valid JSON ({e}); the file is damaged") from None
    fmt = header.get("format") if isinstance(header, dict) else None
    if fmt != FORMAT:
        name, _, version = str(fmt).rpartition("/")
        if name == FORMAT.rpartition("/")[0] and version.isdigit() and int(version) > int(FORMAT.rpartition("/")[2]):
            raise ExportError(f"{path}: written by a newer clcalib (format {fmt!r}; this one reads {FORMAT!r}); "
                              "upgrade clcalib to read it")
        raise ExportError(f"{path}: format {fmt!r} is not a clcalib checkpoint format (this clcalib reads {FORMAT!r})")
    return header


def load_quantized(path: str | Path, device: str = "cpu") -> QuantModel:
    """A runnable quantized model in eval mode; the checkpoint's header is ``model.header``."""
    header = read_header(path)
    shape = header.get("input_shape")
    if not (isinstance(header.get("layers"), dict) and isinstance(header.get("num_classes"), int)
            and isinstance(shape, list) and len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ExportError(f"{path}: the header lacks a valid layers / num_classes / input_shape; the file is damaged "
                          "or from another tool")
    try:
        cfg = CalibConfig.model_validate(header["config"])
        if "graph" in header:
            qm = QuantModel(_stored_program(path, header), QuantSpec.from_config(cfg), torch.zeros(shape),
                            Partition.GRAPH, decomposed=True)
        else:
            fp = build_model(header["arch"], header["num_classes"])
            qm = QuantModel(fp, QuantSpec.from_config(cfg), torch.zeros(shape), cfg.partition)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ExportError(f"{path}: the header does not describe a model this clcalib can rebuild "
                          f"({str(e).splitlines()[0][:300]})") from None
    mods = dict(qm.named_modules())
    for name, spec in header["layers"].items():
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], int)
                and MIN_BITS <= spec[0] <= MAX_BITS):
            raise ExportError(f"{path}: layer {name} has {spec[0] if isinstance(spec, list) and spec else spec!r}-bit "
                              f"weights; clcalib reads {MIN_BITS} to {MAX_BITS} bits (the file is damaged or from another tool)")
    layers = {n for n, m in mods.items() if isinstance(m, QuantLayer)}
    if set(header["layers"]) != layers:
        raise ExportError(f"{path}: the checkpoint has {len(header['layers'])} layers, {header['arch']} has {len(layers)}; "
                          "the file is damaged or from another version")
    try:
        _load_tensors(path, header, mods)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as e:  # missing, mis-shaped, truncated
        raise ExportError(f"{path}: missing or damaged tensors ({str(e).splitlines()[0][:300]})") from None
    missing = [n for n, m in mods.items() if isinstance(m, ActQuantizer) and not m.initialized]
    if missing:
        raise ExportError(f"{path}: no activation parameters for {missing[:3]}; the file is damaged or incomplete")
    qm.header = header
    return qm.to(device).eval()


def _load_tensors(path, header: dict, mods: dict) -> None:
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for name, (bits, shape) in header["layers"].items():
            m = mods.get(name)
            if not isinstance(m, QuantLayer) or list(m.weight.shape) != shape or m.wq.bits != bits:
                raise ExportError(f"{path}: layer {name} does not match {header['arch']} as rebuilt; the file is damaged or from another version")
            scale = _shaped(f.get_tensor(f"{name}.w_scale"), m.wq.scale.shape, f"{name}.w_scale")
            zero = _integers(_shaped(f.get_tensor(f"{name}.w_zero"), m.wq.zero.shape, f"{name}.w_zero").float(),
                             bits, f"{name}.w_zero")
            m.wq.load_codes(unpack_bits(f.get_tensor(f"{name}.qweight"), bits, int(np.prod(shape))).reshape(shape),
                            scale, zero)
            m.bias = f.get_tensor(f"{name}.bias")
            m.weight = m.wq(m.weight)  # FP slot holds the dequantized weight: nothing FP survives
        for name, m in mods.items():
            if isinstance(m, ActQuantizer) and f"{name}.a_scale" in keys:
                m.load_range(_shaped(f.get_tensor(f"{name}.a_scale"), (), f"{name}.a_scale"),
                             _integers(_shaped(f.get_tensor(f"{name}.a_zero"), (), f"{name}.a_zero"), m.bits,
                                       f"{name}.a_zero"))


def _shaped(t: torch.Tensor, shape, name: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape) or not torch.isfinite(t.float()).all():
        raise ValueError(f"{name} has shape {tuple(t.shape)} (expected {tuple(shape)}) or non-finite values")
    return t


def _integers(t: torch.Tensor, bits: int, name: str) -> torch.Tensor:
    """Zero points must be whole numbers on the code range, or every value shifts."""
    if not (torch.equal(t, t.round()) and bool(((t >= 0) & (t <= (1 << bits) - 1)).all())):
        raise ValueError(f"{name}: zero points must be integers in [0, {(1 << bits) - 1}] for {bits} bits")
    return t
