"""ONNX QDQ export of the reference model on real Fashion-MNIST images. The reference target
is the quantized network exactly (integer weights in the narrowest ONNX type, QDQ activations
clipped to their calibrated bit width); the integer targets (the default) run every conv and
add on ONNX Runtime's integer kernels; each runtime reproduces the torch model, and broken
inputs give one-line errors."""

from __future__ import annotations

import importlib.util
import json
import platform
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load_file, save_file
from test_cli import WEIGHTS, clcalib
from torch import nn

import clcalib as lib
from clcalib.errors import ExportError
from clcalib.export import load_quantized, read_header, save_quantized
from clcalib.export.onnx_check import check_onnx, onnx_predict
from clcalib.export.onnx_qdq import build_onnx, export_onnx
from clcalib.graph.registry import build_model, read_state_dict
from clcalib.metrics import agreement
from clcalib.quant.activation import ActQuantizer
from clcalib.testing import PREPROCESS, calibration_indices, split

SHAPE = (1, 3, 28, 28)


def images(name: str, idx) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = split(name)
    t = torch.from_numpy(x[np.asarray(idx)].astype(np.float32) / 255.0)[:, None].expand(-1, 3, -1, -1)
    return ((t - 0.286) / 0.353).contiguous(), torch.from_numpy(y[np.asarray(idx)].astype(np.int64))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """resnet18 at W4A3 (mse ranges, no reconstruction: fast), first/last layer at 8 bits."""
    torch.manual_seed(0)
    fp = build_model("resnet18", 10, read_state_dict(WEIGHTS))
    calib, _ = images("train", calibration_indices(128))
    res = lib.calibrate(fp, calib, {"method": "mse", "w_bits": 4, "a_bits": 3, "device": "cpu", "calib_size": 128,
                                      "preprocess": PREPROCESS})
    d = tmp_path_factory.mktemp("onnx")
    ckpt = d / "q.safetensors"
    save_quantized(res.model, ckpt, arch="resnet18", num_classes=10, config=res.config, input_shape=SHAPE)
    model = load_quantized(ckpt)
    path = d / "model.onnx"
    export_onnx(model, path, SHAPE, target="reference")
    return {"model": model, "ckpt": ckpt, "onnx": path, "fp": fp, "dir": d, "calib": calib}


def test_graph_is_qdq_with_integer_weights_of_the_calibrated_widths(calibrated):
    proto = onnx.load(calibrated["onnx"])
    onnx.checker.check_model(proto, full_check=True)
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    layers = calibrated["model"].layers()
    weighted = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weighted) == len(layers) == 21
    for node, layer in zip(weighted, layers, strict=True):  # the trace keeps execution order
        dq = producer[node.input[1]]
        assert dq.op_type == "DequantizeLinear" and dq.input[0] in inits, node.name
        w = inits[dq.input[0]]
        # the narrowest type, except that 8-bit codes are unsigned (ONNX Runtime's u8 x s8
        # kernels saturate with 8-bit signed weights on x86 without VNNI, its u8 x u8 ones do not)
        TP, bits = onnx.TensorProto, layer.wq.bits
        want = TP.INT4 if bits <= 4 else TP.INT8 if bits < 8 else TP.UINT8
        assert w.data_type == want and inits[dq.input[2]].data_type == want, (node.name, bits, w.data_type)
        # the codes (below 8 bits shifted by 2^(bits-1) into the signed type) are exactly the checkpoint's
        offset = 1 << (bits - 1) if bits < 8 else 0
        assert np.array_equal(numpy_helper.to_array(w).astype(np.int32), layer.wq.q.numpy().astype(np.int32) - offset)
        assert len(numpy_helper.to_array(inits[dq.input[1]])) == layer.weight.shape[0]  # per output channel
    bits = sorted({layers[0].wq.bits, layers[-1].wq.bits, layers[1].wq.bits})
    assert bits == [4, 8], bits  # body 4-bit, first conv and last linear 8-bit as calibrated
    # one QuantizeLinear per activation quantizer; codes clipped to [0, 2^bits - 1]
    acts = [m for m in calibrated["model"].modules() if isinstance(m, ActQuantizer) and m.initialized]
    qs = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == len(acts)
    clip_max = sorted(int(numpy_helper.to_array(inits[n.input[2]])) for n in proto.graph.node
                      if n.op_type == "Clip" and producer.get(n.input[0], n).op_type == "QuantizeLinear")
    assert clip_max == sorted(2**q.bits - 1 for q in acts if q.bits < 8)
    assert set(clip_max) == {7}  # 3-bit activations stay 3-bit; the 8-bit one needs no clip
    fp_bytes = len(build_onnx(calibrated["model"], SHAPE, quantized=False).SerializeToString())
    assert calibrated["onnx"].stat().st_size < fp_bytes / 7, (calibrated["onnx"].stat().st_size, fp_bytes)


def test_each_weight_width_gets_the_narrowest_type_its_kernels_do_not_saturate(calibrated):
    """2-4 bits INT4 and 5-7 bits INT8 (shifted by 2^(bits-1): at most 64 in magnitude, so ONNX
    Runtime's u8 x s8 kernels cannot overflow int16), 8 bits UINT8 as stored; code - zero point
    is the checkpoint's at every width."""
    model = load_quantized(calibrated["ckpt"])
    layer = model.layers()[1]  # 4-bit codes: valid codes at every width from 4 to 8
    want_diff = layer.wq.q.numpy().astype(np.int32) - layer.wq.zero.numpy().astype(np.int32).reshape(-1, 1, 1, 1)
    TP = onnx.TensorProto
    for bits, elem in ((4, TP.INT4), (5, TP.INT8), (7, TP.INT8), (8, TP.UINT8)):
        layer.wq.bits = bits
        proto = build_onnx(model, SHAPE, target="reference")
        inits = {t.name: t for t in proto.graph.initializer}
        producer = {o: n for n in proto.graph.node for o in n.output}
        dq = producer[[n for n in proto.graph.node if n.op_type == "Conv"][1].input[1]]
        w, z = inits[dq.input[0]], inits[dq.input[2]]
        assert w.data_type == z.data_type == elem, (bits, w.data_type, z.data_type)
        diff = numpy_helper.to_array(w).astype(np.int32) - numpy_helper.to_array(z).astype(np.int32).reshape(-1, 1, 1, 1)
        assert np.array_equal(diff, want_diff), bits


def test_onnx_runtime_reproduces_the_torch_model_on_real_images(calibrated):
    x, y = images("t10k", range(0, 10000, 20))
    with torch.no_grad():
        ref = calibrated["model"](x)
    got = check_onnx(calibrated["onnx"], ref, x, y)
    # 3-bit activations without reconstruction: boundary-sensitive (see MIN_AGREEMENT)
    assert got["onnx_top1_agreement"] >= 98.5, got
    assert abs(got["onnx_top1"] - 100.0 * float((ref.argmax(1) == y).float().mean())) <= 1.0, got
    # a subtly wrong file (an eighth of one layer's channel scales off by 1.5x) fails the check
    proto = onnx.load(calibrated["onnx"])
    zs = [t for t in proto.graph.initializer if "wscale" in t.name]
    arr = numpy_helper.to_array(zs[3]).copy()
    arr[: len(arr) // 8] *= 1.5
    zs[3].CopyFrom(numpy_helper.from_array(arr, zs[3].name))
    bad = calibrated["dir"] / "tampered.onnx"
    onnx.save(proto, bad)
    with pytest.raises(ExportError, match="agrees with the torch model's on only"):
        check_onnx(bad, ref, x, y)


def test_fp32_export_matches_the_float_model(calibrated, tmp_path):
    from clcalib.config import CalibConfig
    from clcalib.graph.partition import QuantModel, QuantSpec

    qm = QuantModel(calibrated["fp"], QuantSpec.from_config(CalibConfig()), torch.zeros(SHAPE))
    path = tmp_path / "fp32.onnx"
    export_onnx(qm, path, SHAPE, quantized=False)
    x, _ = images("t10k", range(64))
    with torch.no_grad():
        ref = calibrated["fp"].eval()(x)
    assert float((onnx_predict(path, x) - ref).abs().max()) < 1e-3


def _rewrite_header(src, dst, edit):
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    header = json.loads(meta["clcalib"])
    edit(header)
    save_file(load_file(str(src)), str(dst), {"clcalib": json.dumps(header)})


def test_bad_checkpoints_give_one_line_errors(calibrated, tmp_path):
    newer = tmp_path / "newer.safetensors"
    _rewrite_header(calibrated["ckpt"], newer, lambda h: h.update(format="clcalib.quantized/2"))
    bits = tmp_path / "bits.safetensors"
    first = next(iter(read_header(calibrated["ckpt"])["layers"]))
    _rewrite_header(calibrated["ckpt"], bits, lambda h: h["layers"][first].__setitem__(0, 9))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(calibrated["ckpt"].read_bytes()[: 5000])
    no_layers = tmp_path / "no_layers.safetensors"
    _rewrite_header(calibrated["ckpt"], no_layers, lambda h: h.update(layers=[]))
    zero = tmp_path / "zero.safetensors"  # a 4-bit layer whose zero point is off the code range
    second = list(read_header(calibrated["ckpt"])["layers"])[1]
    tensors = load_file(str(calibrated["ckpt"]))
    tensors[f"{second}.w_zero"] = torch.full_like(tensors[f"{second}.w_zero"], 20)
    from safetensors import safe_open

    with safe_open(str(calibrated["ckpt"]), "pt") as f:
        save_file(tensors, str(zero), f.metadata())
    cases = [(newer, "newer clcalib"), (bits, "9-bit"), (broken, "not a readable safetensors file"),
             (no_layers, "lacks a valid layers"), (zero, "zero points must be integers in [0, 15]")]
    r = clcalib("export", "--checkpoint", newer, "--out", tmp_path / "m.onnx", process=True)  # one as a user runs it
    assert r.returncode == 2 and "newer clcalib" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for path, message in cases:  # the same main() in this process: the rest without a process start each
        r = clcalib("export", "--checkpoint", path, "--out", tmp_path / "m.onnx")
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (path, r.stderr)
    assert not (tmp_path / "m.onnx").exists()
    model = load_quantized(calibrated["ckpt"])
    model.layers()[4].wq.bits = 1
    with pytest.raises(ExportError, match="1-bit quantization cannot be exported"):
        build_onnx(model, SHAPE, target="reference")


def test_an_export_that_fails_its_check_leaves_no_file(calibrated, tmp_path):
    import clcalib.export.onnx_check as oc

    x, y = images("t10k", range(100))
    with pytest.raises(ExportError, match="agrees with the torch model's on only"):  # no file can pass 100.1 %
        oc.export_checked(calibrated["model"], tmp_path / "m.onnx", SHAPE, x, y, range_images=calibrated["calib"],
                          min_agreement=100.1)
    assert list(tmp_path.iterdir()) == []


def test_forms_the_exporter_does_not_translate_are_refused_by_name():
    class Net(nn.Module):
        def __init__(self, train_dropout: bool):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 10)
            self.train_dropout = train_dropout

        def forward(self, x):
            x = self.conv(x).mean(3).mean(dim=2)  # both spellings of a reduction over one dim
            x = torch.nn.functional.dropout(x, 0.5, training=self.train_dropout)
            return self.fc(x)

    from clcalib.config import CalibConfig, Partition
    from clcalib.errors import UnsupportedModel
    from clcalib.graph.partition import QuantModel, QuantSpec

    with pytest.raises(UnsupportedModel, match="draws random numbers .*native_dropout"):  # the graph path refuses it
        QuantModel(Net(True).eval(), QuantSpec.from_config(CalibConfig()), torch.zeros(2, 3, 8, 8))
    for train, ok in ((False, True), (True, False)):  # the module path's fx export
        qm = QuantModel(Net(train).eval(), QuantSpec.from_config(CalibConfig()), torch.zeros(1, 3, 8, 8),
                        Partition.MODULES)
        if ok:
            build_onnx(qm, (1, 3, 8, 8), quantized=False)
        else:
            with pytest.raises(ExportError, match="dropout in training mode"):
                build_onnx(qm, (1, 3, 8, 8), quantized=False)


def test_cli_export_checks_against_a_labeled_folder(calibrated, tmp_path):
    from clcalib.testing import write_zip

    ev = write_zip(tmp_path / "eval.zip", "t10k", range(300), by_class=True)
    r = clcalib("export", "--checkpoint", calibrated["ckpt"], "--out", tmp_path / "m.onnx", "--eval", ev, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["onnx_checked_images"] == 300 and out["onnx_top1_agreement"] >= 98.0 and out["onnx_top1"] > 50, out


@pytest.fixture(scope="module")
def mobilenet_w8a8(tmp_path_factory):
    """mobilenet_v2 W8A8 (mse ranges, symmetric weights): 8-bit weights in 41 convs ONNX Runtime
    runs as QLinearConv."""
    fp = build_model("mobilenet_v2", 10, read_state_dict(WEIGHTS.parent / "fmnist_mobilenet_v2.safetensors"))
    calib, _ = images("train", calibration_indices(64))
    res = lib.calibrate(fp, calib, {"method": "mse", "w_bits": 8, "a_bits": 8, "device": "cpu", "calib_size": 64,
                                    "w_symmetric": True, "preprocess": PREPROCESS})
    d = tmp_path_factory.mktemp("mobilenet")
    files = {t: d / f"{t}.onnx" for t in ("reference", "onnxruntime", "onnxruntime-vnni")}
    for t, path in files.items():
        export_onnx(res.model, path, SHAPE, target=t, range_images=calib)
    x, y = images("t10k", range(0, 10000, 50))
    with torch.no_grad():
        ref = res.model(x)
    return {"path": files["reference"], "files": files, "x": x, "y": y, "ref": ref, "model": res.model, "calib": calib}


def test_relu6_before_a_quantizer_becomes_its_top_code(mobilenet_w8a8):
    """mobilenet_v2: Conv -> ReLU6 -> quantizer is written Conv -> Q -> Clip(codes) -> DQ (exact,
    zero point 0), so integer runtimes see the Conv -> Q they fuse; ONNX Runtime agrees."""
    m = mobilenet_w8a8
    proto = onnx.load(m["path"])
    consumers = {i: n for n in proto.graph.node for i in n.input}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    after = {consumers[n.output[0]].op_type for n in convs}
    assert "Relu" not in after and "Clip" not in after, after  # no float activation between conv and Q
    assert sum(consumers[n.output[0]].op_type == "QuantizeLinear" for n in convs) >= 34, len(convs)
    got = check_onnx(m["path"], m["ref"], m["x"], m["y"])
    assert got["onnx_top1_agreement"] >= 99.0, got


# Run in ONNX Runtime on an emulated x86 CPU without VNNI (qemu's Haswell: AVX2, no AVX-512), whatever
# this machine has. The probe first shows that ONNX Runtime's uint8 x int8 kernel there adds two
# products in a saturating int16 (255 x 127 x 2 > 32767; VNNI CPUs add in int32 and are exact),
# then the W8A8 export must still reproduce the torch model: its 8-bit weights are uint8.
_EMULATED = """
import sys, numpy as np, onnxruntime as ort
from onnx import helper as h, TensorProto as TP
def session(model):
    so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
graph = h.make_graph([h.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe",
                     [h.make_tensor_value_info("a", TP.UINT8, [1, 64])], [h.make_tensor_value_info("y", TP.INT32, [1, 1])],
                     initializer=[h.make_tensor("b", TP.INT8, [64, 1], [127] * 64)])
probe = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
probe.ir_version = 10
print(int(session(probe.SerializeToString()).run(None, {"a": np.full((1, 64), 255, np.uint8)})[0][0, 0]))
data = np.load(sys.argv[1])
for i, model in enumerate(sys.argv[2:]):
    np.save(f"{sys.argv[1]}.{i}.npy", session(model).run(None, {"input": data["x"]})[0])
"""


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("qemu-x86_64") is None,
                    reason="needs an x86-64 machine with qemu-x86_64 (apt-get install qemu-user)")
def test_w8a8_targets_on_x86_without_vnni(mobilenet_w8a8, tmp_path):
    """The reference and onnxruntime files (8-bit weights unsigned) are exact there; the
    onnxruntime-vnni file's signed 8-bit weights saturate (what docs/deploy.md tells users)."""
    from clcalib.quant.switch import eight_bit_activations

    m = mobilenet_w8a8
    x = m["x"][::2]  # 100 images: emulation is slow
    with torch.no_grad(), eight_bit_activations(m["model"]):  # what the integer files hold (ReLU6 widened)
        widened = m["model"](x)
    np.savez(tmp_path / "x.npz", x=x.numpy())
    names = ["reference", "onnxruntime", "onnxruntime-vnni"]
    r = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", _EMULATED, str(tmp_path / "x.npz"),
                        *(str(m["files"][t]) for t in names)],
                       capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    probe = int(r.stdout.split()[-1])
    assert probe == 32 * 32767, probe  # 32 saturated pairs, not 255 x 127 x 64: the non-VNNI kernel ran
    got = {t: torch.from_numpy(np.load(tmp_path / f"x.npz.{i}.npy")) for i, t in enumerate(names)}
    refs = {"reference": m["ref"][::2], "onnxruntime": widened, "onnxruntime-vnni": widened}
    fit = {t: (agreement(refs[t], got[t]), float((got[t] - refs[t]).abs().max())) for t in names}
    assert fit["reference"][0] >= 99.0 and fit["reference"][1] < 0.5, fit
    assert fit["onnxruntime"][0] >= 99.0, fit
    assert fit["onnxruntime-vnni"][1] > 2 * fit["onnxruntime"][1], fit  # saturated sums: far larger errors


def test_a_vnni_file_is_checked_for_what_this_cpu_runs(mobilenet_w8a8, tmp_path):
    """int8_sums_saturate says what this CPU's ONNX Runtime does with the onnxruntime-vnni
    layout, and the check follows it: where the sums saturate (x86 without VNNI, this machine
    included) the file run on integer kernels is far off, so it is checked on float kernels with
    a warning naming the target to deploy instead; where they do not, it is checked as run."""
    from clcalib.export.onnx_check import export_checked, int8_sums_saturate, onnx_predict
    from clcalib.quant.switch import eight_bit_activations

    m = mobilenet_w8a8
    with torch.no_grad(), eight_bit_activations(m["model"]):
        widened = m["model"](m["x"])
    runs = {t: onnx_predict(m["files"][t], m["x"]) for t in ("onnxruntime", "onnxruntime-vnni")}
    err = {t: float((got - widened).abs().max()) for t, got in runs.items()}
    assert agreement(widened, runs["onnxruntime"]) >= 99.0, err  # the default: exact on every CPU
    saturates = int8_sums_saturate()
    assert (err["onnxruntime-vnni"] > 2 * err["onnxruntime"]) == saturates, (saturates, err)
    got, _ = export_checked(m["model"], tmp_path / "v.onnx", SHAPE, m["x"], m["y"], target="onnxruntime-vnni",
                            range_images=m["calib"])
    assert got["onnx_top1_agreement"] >= 98.0, got  # float kernels: sums in another order than torch's
    if saturates:
        assert got["onnx_check_kernels"] == "float" and "export with target onnxruntime" in got["onnx_check_note"]
    else:
        assert "onnx_check_note" not in got
    if importlib.util.find_spec("openvino"):  # OpenVINO's int8 kernels: the same sums, reported where they saturate
        ov, _ = export_checked(m["model"], tmp_path / "ov.onnx", SHAPE, m["x"], m["y"], target="openvino",
                               range_images=m["calib"])
        assert ov["onnx_top1_agreement"] >= 98.0, ov
        if saturates:  # OpenVINO may run this file wrong here (85 % agreement on this machine): not a failure
            assert "OpenVINO's int8 kernels on this CPU saturate too" in ov["onnx_check_note"], ov
        else:
            assert ov["openvino_top1_agreement"] >= 98.0, ov
    assert "onnx_check_note" not in export_checked(m["model"], tmp_path / "d.onnx", SHAPE, m["x"],
                                                   range_images=m["calib"])[0]


def _ort_ops(path, tmp_path):
    import collections

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_integer_target_runs_every_conv_and_add_on_integer_kernels(calibrated, tmp_path):
    """resnet18 W4A3 (block placement: residual branches float in the calibrated model) for
    target onnxruntime: every conv, the first included, and every residual add become ONNX
    Runtime's integer kernels, with no Clip left; the file holds the model with its 3-bit
    activations on an 8-bit grid over the same clamp range, and runs several times faster than
    the reference file."""
    from clcalib.export.latency import median_ms
    from clcalib.export.onnx_check import export_checked
    from clcalib.quant.switch import eight_bit_activations

    model, path = calibrated["model"], tmp_path / "int.onnx"
    x, y = images("t10k", range(0, 10000, 20))
    got, torch_logits = export_checked(model, path, SHAPE, x, y, range_images=calibrated["calib"])
    ops = _ort_ops(path, tmp_path)
    assert ops["QLinearConv"] == 20 and ops["QLinearAdd"] == 8 and not ops["Conv"] and not ops["Clip"], ops
    proto = onnx.load(path)
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    types = {}
    for n in proto.graph.node:
        if n.op_type == "Conv":  # weights in 8-bit codes: signed below 8 bits, unsigned at 8 (exact on every CPU)
            types[n.name] = inits[producer[n.input[1]].input[0]].data_type
    eight = [k for k, t in types.items() if t == onnx.TensorProto.UINT8]
    assert len(eight) == 1 and "conv1" in eight[0] and "layer" not in eight[0], types  # the stem keeps 8 bits
    assert sum(t == onnx.TensorProto.INT8 for t in types.values()) == 19, types
    with torch.no_grad():
        assert torch.equal(torch_logits, model(x))  # the report's model is the calibrated one
        with eight_bit_activations(model):
            widened = model(x)
    assert got["export_target"] == "onnxruntime" and got["onnx_top1_agreement"] >= 99.0, got
    assert abs(got["onnx_top1"] - 100.0 * float((widened.argmax(1) == y).float().mean())) <= 0.5, got
    ms = median_ms({"int": path, "reference": calibrated["onnx"]}, "onnxruntime", x[:32].numpy())
    assert ms["int"] * 2 < ms["reference"], ms


def test_openvino_target_needs_symmetric_weights_and_is_checked_in_openvino(calibrated, tmp_path):
    from clcalib.config import CalibConfig
    from clcalib.export.onnx_check import export_checked

    with pytest.raises(ValueError, match="export target openvino: its int8 kernels need symmetric weights"):
        CalibConfig.model_validate({"export": ["onnx"], "export_target": "openvino"})
    r = clcalib("export", "--checkpoint", calibrated["ckpt"], "--out", tmp_path / "m.onnx", "--target", "openvino")
    assert r.returncode == 2 and "need symmetric weights" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    pytest.importorskip("openvino")
    x, y = images("t10k", range(0, 10000, 50))
    got, _ = export_checked(calibrated["model"], tmp_path / "ov.onnx", SHAPE, x, y, target="openvino",
                            range_images=calibrated["calib"])
    assert got["openvino_top1_agreement"] >= 98.0 and got["onnx_top1_agreement"] >= 98.0, got
    from clcalib.export.onnx_check import int8_sums_saturate

    # its signed 8-bit weights (first conv, last linear): ONNX Runtime's check on float kernels
    # where int8 sums saturate, and OpenVINO's agreement there reported, not required
    assert ("OpenVINO's int8 kernels on this CPU saturate too" in got.get("onnx_check_note", "")) == int8_sums_saturate()


def test_the_old_name_of_the_exact_layout_still_means_it(calibrated, tmp_path):
    """Configs, jobs and scripts written before the exact layout became the default name it
    onnxruntime-avx2: they get that layout, now called onnxruntime."""
    import argparse

    from clcalib.config import CalibConfig
    from clcalib.config_flags import add_config_flags, config_overrides
    from clcalib.export.profiles import profile

    assert CalibConfig.model_validate({"export_target": "onnxruntime-avx2"}).export_target == "onnxruntime"
    assert profile("onnxruntime-avx2") is profile("onnxruntime")
    p = argparse.ArgumentParser()
    add_config_flags(p)  # calibrate's and submit's flags
    assert config_overrides(p.parse_args(["--target", "onnxruntime-avx2"]))["export_target"] == "onnxruntime"
    # this checkpoint holds no ranges: the refusal names the target the old name now is
    r = clcalib("export", "--checkpoint", calibrated["ckpt"], "--out", tmp_path / "m.onnx", "--target", "onnxruntime-avx2")
    assert r.returncode == 2 and "export target onnxruntime writes" in r.stderr, r.stderr


def test_tensorrt_target_has_zero_point_0_everywhere_and_keeps_the_clamps(calibrated, tmp_path):
    """TensorRT takes only symmetric int8: every activation QDQ is INT8 with zero point 0, the
    calibrated clamps stay (a ReLU or Clip before each quantizer), and ONNX Runtime agrees with
    the model run with 8-bit activations."""
    from clcalib.config import CalibConfig
    from clcalib.export.onnx_check import export_checked

    with pytest.raises(ValueError, match="export target tensorrt: its int8 kernels need symmetric weights"):
        CalibConfig.model_validate({"export": ["onnx"], "export_target": "tensorrt"})
    x, y = images("t10k", range(0, 10000, 50))
    got, _ = export_checked(calibrated["model"], tmp_path / "trt.onnx", SHAPE, x, y, target="tensorrt",
                            range_images=calibrated["calib"])
    assert got["onnx_top1_agreement"] >= 98.0, got
    proto = onnx.load(tmp_path / "trt.onnx")
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    qs = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert qs and all(inits[n.input[2]].data_type == onnx.TensorProto.INT8 and
                      int(numpy_helper.to_array(inits[n.input[2]])) == 0 for n in qs)
    clamped = sum(producer.get(n.input[0]) is not None and producer[n.input[0]].op_type in ("Relu", "Clip") for n in qs)
    acts = [m for m in calibrated["model"].modules() if isinstance(m, ActQuantizer) and m.initialized]
    assert clamped == len(acts), (clamped, len(acts))


class _ZooOps(nn.Module):
    """The ops timm's zoo needs beyond the CNN set (issue 30): ResNet-D's average-pool shortcut
    (ceil_mode, count_include_pad=False), GhostNet's in-place slice of channels (slice_scatter),
    timm attention's unbind, MobileViT's split, a chunk, PoolFormer's GroupNorm, DenseNet's lone
    BatchNorm, an explicit pad, hard-sigmoid gates and a partial slice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
        self.gn = nn.GroupNorm(2, 8)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 12, 1)
        self.head = nn.Linear(6, 10)
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)  # ECA's channel attention
        self.table = nn.Parameter(torch.randn(7, 8))  # a relative-position bias table and its index
        self.register_buffer("index", torch.tensor([[3, 0, 6, 1, 2, 5, 4, 0]]).repeat(8, 1))
        nn.init.uniform_(self.bn.running_var, 0.5, 2)
        nn.init.normal_(self.bn.running_mean)

    def forward(self, x):
        x = self.stem(x)
        y = self.pool(x)  # 15 -> 8 with a partial last window
        y = self.gn(y) + torch.relu(self.bn(y))
        y = y * torch.sigmoid(self.eca(y.mean((2, 3)).unsqueeze(1)).transpose(1, 2).unsqueeze(-1))
        gx = torch.linalg.vector_norm(y, 2, dim=(2, 3), keepdim=True)  # ConvNeXt-V2's GRN
        y = torch.addcmul(y, y, gx / (gx.mean(1, keepdim=True) + 1e-6), value=0.5) + torch.sin(y).cos()
        y = torch.roll(y, (2, -3), (2, 3)) + self.table[self.index.view(-1)].view(8, 8, 8).permute(2, 0, 1)
        y = y + torch.nn.functional.interpolate(y[:, :, ::2, ::2], scale_factor=2.0, mode="nearest")
        mask = torch.zeros(y.shape[0], 8, 8, dtype=torch.bool)  # EdgeNeXt's position encoding
        pos = (~mask).cumsum(1, dtype=torch.float32)
        enc = torch.stack((pos.sin(), pos.cos()), dim=3).reshape(y.shape[0], 8, 16)
        y = y + enc[:, None, :, :8].clamp_min(0.1)
        y = torch.nn.functional.pad(y, (1, 0, 0, 1))
        z = self.conv(y)
        a, b, c = z.split([4, 4, 4], dim=1)
        p, q = c.chunk(2, dim=1)
        out = (a * torch.nn.functional.hardsigmoid(b)).clone()
        out[:, :2] = p + q  # slice_scatter
        t = out.flatten(2).transpose(1, 2)  # N x L x 4
        t = t.contiguous().view(-1, 4).reshape_as(t)  # LeViT's reshape_as
        bias = self.table[:4, :4].reshape(1, 4, 4) * 0.1  # attention with an additive float mask (CoAtNet)
        att = torch.nn.functional.scaled_dot_product_attention(t[:, None, :4], t[:, None, :4], t[:, None, :4],
                                                               attn_mask=bias)[:, 0]
        t = torch.cat([t[:, :4] + att, t[:, 4:]], dim=1)
        t = t + torch.nn.functional.interpolate(t[:, None, ::2], size=(t.shape[1], 4), mode="bilinear")[:, 0]
        u, v = t.reshape(t.shape[0], -1, 2, 2).permute(2, 0, 1, 3).unbind(0)
        w = torch.cat([(u * v).sum(dim=1), torch.rsqrt(t.pow(2).mean(1) + 1) + t[:, 3:5].mean(1)], dim=1)
        return self.head(torch.cat([w, w.abs().clamp(max=3)], dim=1)[:, :6])


def test_timm_zoo_ops_export_to_the_float_model(tmp_path):
    from clcalib.config import CalibConfig
    from clcalib.graph.partition import QuantModel, QuantSpec
    from clcalib.graph.program import check_archive, program_to_bytes
    from clcalib.quant.switch import quantization

    torch.manual_seed(0)
    net, x = _ZooOps().eval(), torch.randn(8, 3, 15, 15)
    check_archive(program_to_bytes(torch.export.export(net, (x[:2],), dynamic_shapes=({0: torch.export.Dim("b")},))))
    qm = QuantModel(net, QuantSpec.from_config(CalibConfig()), x[:2])
    export_onnx(qm, tmp_path / "fp32.onnx", (1, 3, 15, 15), quantized=False)
    with torch.no_grad(), quantization(qm.model, False):
        ref = qm(x)
        assert torch.allclose(ref, net(x), atol=1e-5)
    assert float((onnx_predict(tmp_path / "fp32.onnx", x) - ref).abs().max()) < 1e-4
