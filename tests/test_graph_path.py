"""Any model in (issue 13): the torch.export graph path. The registry architectures give the
same units, layers and quantized outputs as the module path; other architectures and a network
written here calibrate, save, reload bit-identically and (CNNs) export to ONNX Runtime; bad
programs are refused by name, and no pickle in an uploaded .pt2 ever runs."""

import dataclasses
import io
import json
import zipfile

import pytest
import torch
import torchvision
from torch import nn

import clcalib
from clcalib.config import CalibConfig, Partition
from clcalib.errors import ExportError, UnsupportedModel
from clcalib.export.checkpoint import load_quantized, save_quantized
from clcalib.graph.partition import QuantModel, QuantSpec
from clcalib.graph.program import BadProgram, check_archive, program_from_bytes, program_to_bytes
from clcalib.graph.registry import ARCHS, build_model
from clcalib.metrics import predict
from clcalib.quant.switch import quantization
from clcalib.testing import REFERENCE, calibration_indices, run_cli, write_zip

SPEC = QuantSpec.from_config(CalibConfig())


class SkipNet(nn.Module):
    """A user's network: a stem, a residual pair written in forward() (no registered block),
    a squeeze-excitation-like gate and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.gate = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.b(torch.relu(self.a(x))))
        g = torch.sigmoid(self.gate(x.mean((2, 3))))
        return self.head((x * g[:, :, None, None]).mean((2, 3)))


def _efficientnet():
    net = torchvision.models.efficientnet_b0(num_classes=10)
    for m in net.modules():  # its initial BatchNorms give outputs of ~1e-13: make the net carry a signal
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.running_var, 0.5, 1.5)
            nn.init.normal_(m.bias, 0, 0.1)
    return net


def _small_convnext():  # convnext_tiny's blocks and downsampling, fewer and narrower (time)
    from torchvision.models.convnext import CNBlockConfig

    return torchvision.models.ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], num_classes=10)


def _small_swin():  # swin_t's shifted-window blocks and patch merging, smaller
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                              window_size=[4, 4], num_classes=10)


def _tiny_vit():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero: every output would be 0
    return vit


class _TimmAttention(nn.Module):  # timm's Attention: one qkv Linear, unbind(0), fused attention
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _TimmBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _TimmAttention(dim, heads)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class _SplitGate(nn.Module):  # MobileViT-v2's linear attention splits one conv's output with split()
    def __init__(self, c):
        super().__init__()
        self.qkv = nn.Conv2d(c, 1 + 2 * c, 1)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        q, k, v = self.qkv(x).split([1, x.shape[1], x.shape[1]], dim=1)
        ctx = (k * q.softmax(dim=-1)).sum(dim=-1, keepdim=True)
        return x + self.out(torch.relu(v) * ctx)


class TimmLikeViT(nn.Module):
    """timm's ViT and MobileViT graph patterns, written without timm: ops that return several
    tensors (unbind, split) inside a block, which the partitioner once took for sizes."""

    def __init__(self, dim=32):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.gate = _SplitGate(dim)
        self.patch = nn.Conv2d(dim, dim, 8, stride=8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(_TimmBlock(dim, 2), _TimmBlock(dim, 2))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(self.gate(torch.relu(self.stem(x)))).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.head(self.norm(self.blocks(x))[:, 0])


def test_timm_style_attention_and_split_blocks_are_units(tmp_path):
    """Issue 30: `clcalib inspect` of timm's ViT / MobileViT crashed in the partitioner."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    (tmp_path / "vit.pt2").write_bytes(_pt2(TimmLikeViT(), x))
    r = run_cli("inspect", "--model", tmp_path / "vit.pt2", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    units = {u["unit"]: u for u in json.loads(r.stdout)}
    assert {"gate", "blocks.0", "blocks.1"} <= set(units), sorted(units)
    assert {lay["name"] for lay in units["blocks.0"]["layers"]} == {
        "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.fc1", "blocks.0.fc2"}
    model = TimmLikeViT().eval()
    qm = QuantModel(model, SPEC, x)
    with torch.no_grad(), quantization(qm.model, False):  # the partitioned graph computes what the model does
        assert torch.allclose(qm(x), model(x), atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_registry_archs_get_the_same_units_and_layers_through_the_graph(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10)
    x = torch.randn(2, 3, 32, 32)
    program = model  # traced once: the second placement partitions the first one's program
    # every_layer too: the placement rule (QuantSpec.in_block_out_bits) is the same one on both paths
    for every_layer in (False, True):
        spec = dataclasses.replace(SPEC, every_layer=every_layer)
        by_modules = QuantModel(model, spec, x, Partition.MODULES)
        by_graph = QuantModel(program, spec, x, Partition.GRAPH, decomposed=program is not model)
        program = by_graph.program
        assert by_graph.unit_names == by_modules.unit_names, every_layer
        shapes = {k: tuple(v.shape) for k, v in by_modules.state_dict().items()}
        # every quantizer in the same place
        assert {k: tuple(v.shape) for k, v in by_graph.state_dict().items()} == shapes, every_layer


def test_reference_resnet18_calibrates_to_the_same_model_through_the_graph(fmnist, reference):
    model = reference("resnet18")
    cfg = dict(method="qdrop", w_bits=4, a_bits=8, iters=5, calib_size=64, device="cpu")
    by_modules = clcalib.calibrate(model, fmnist["train"], {**cfg, "partition": "modules"}).model
    by_graph = clcalib.calibrate(model, fmnist["train"], {**cfg, "partition": "graph"}).model
    x = fmnist["test"][:500]
    a, b = predict(by_modules, x), predict(by_graph, x)
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    assert (a.argmax(1) == fmnist["test_labels"][:500]).float().mean() > 0.8


@pytest.mark.parametrize("make, size, onnx", [
    (SkipNet, 16, True),
    (_efficientnet, 32, True),
    (_small_convnext, 32, True),
    (_tiny_vit, 32, True),
    (_small_swin, 32, False),
])
def test_other_architectures_calibrate_save_reload_and_export(make, size, onnx, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = make().eval()
    data = torch.randn(48, 3, size, size)
    cfg = CalibConfig(iters=3, calib_size=48, batch_size=8, device="cpu", a_bits=8)  # random nets: 4-bit codes can round all to 0
    result = clcalib.calibrate(model, data, cfg)
    assert len(result.units) >= 3
    path = tmp_path / "q.safetensors"
    save_quantized(result.model, path, arch="custom", num_classes=10, config=cfg, input_shape=(1, 3, size, size))
    traced, decompose = [], torch.export.ExportedProgram.run_decompositions
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions",
                        lambda self, *a, **k: traced.append(1) or decompose(self, *a, **k))
    reloaded = load_quantized(path)
    assert traced == []  # the stored graph is in ATen form: not traced again (seconds per load)
    with torch.no_grad():
        assert torch.equal(result.model(data[:8]), reloaded(data[:8]))
    from clcalib.export.onnx_qdq import export_onnx

    if onnx:
        from clcalib.export.onnx_check import session

        export_onnx(reloaded, tmp_path / "q.onnx", (1, 3, size, size), target="reference")  # exact simulation
        export_onnx(reloaded, tmp_path / "int.onnx", (1, 3, size, size), range_images=data)  # default: integer kernels
        for batch in (1, 8):  # the batch dimension stays dynamic in the file
            got = torch.from_numpy(session(tmp_path / "q.onnx").run(None, {"input": data[:batch].numpy()})[0])
            fast = torch.from_numpy(session(tmp_path / "int.onnx").run(None, {"input": data[:batch].numpy()})[0])
            with torch.no_grad():
                ref = reloaded(data[:batch])
            # float LayerNorm/GELU/attention differ in the last bits between torch and ONNX Runtime,
            # which can move a value across a quantizer's rounding boundary: a step, not more
            assert ref.abs().max() > 0.1 and torch.allclose(got, ref, atol=0.02 * float(ref.abs().max()))
            assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.85
            # the integer file adds 8-bit codes where the calibration kept float (residual sums)
            assert float((fast - ref).norm() / ref.norm()) < 0.15, float((fast - ref).norm() / ref.norm())
    else:  # Swin's shifted windows (roll, pad, index, masks) have no QDQ export yet: refused by name
        for target in ("reference", "onnxruntime"):
            with pytest.raises(ExportError, match="has no ONNX export here"):
                export_onnx(reloaded, tmp_path / "q.onnx", (1, 3, size, size), target=target, range_images=data)


def test_the_checkpoint_carries_no_float_layer_weights_and_no_calibration_images(tmp_path):
    torch.manual_seed(0)
    model = SkipNet().eval()
    data = torch.randn(32, 3, 16, 16)
    cfg = CalibConfig(iters=2, calib_size=32, device="cpu")
    result = clcalib.calibrate(model, data, cfg)
    path = tmp_path / "q.safetensors"
    save_quantized(result.model, path, arch="custom", num_classes=10, config=cfg, input_shape=(1, 3, 16, 16))
    from clcalib.export.checkpoint import _stored_program, read_header

    ep = _stored_program(path, read_header(path))
    for name in ("stem.weight", "a.weight", "b.weight", "gate.weight", "head.weight"):
        assert not ep.state_dict[name].any(), name
    assert not ep.example_inputs
    assert result.model.program.state_dict["a.weight"].any()  # the caller's program is left as it was


def test_a_stored_graph_is_trusted_only_as_far_as_torchs_verifier_checks_it(tmp_path):
    """A checkpoint's graph is not traced again at load (it is in ATen form when clcalib writes it);
    one edited to an in-place op (allowed in an upload, which is traced into functional form) is
    refused by torch's ATen verifier when it is read, as a damaged file."""
    import json
    import zlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    from clcalib.export.checkpoint import GRAPH_TENSOR

    torch.manual_seed(0)
    result = clcalib.calibrate(SkipNet().eval(), torch.randn(16, 3, 16, 16), CalibConfig(iters=1, calib_size=16, device="cpu"))
    path = tmp_path / "q.safetensors"
    save_quantized(result.model, path, arch="custom", num_classes=10, config=result.config, input_shape=(1, 3, 16, 16))
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    raw = zlib.decompress(tensors[GRAPH_TENSOR].numpy().tobytes())
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        name = next(n for n in z.namelist() if n.endswith("models/model.json"))
        program = z.read(name).decode()
    assert '"torch.ops.aten.relu.default"' in program and '"ATEN"' in program
    forged = _rewrite(raw, "models/model.json",
                      program.replace('"torch.ops.aten.relu.default"', '"torch.ops.aten.relu_.default"', 1).encode())
    tensors[GRAPH_TENSOR] = torch.frombuffer(bytearray(zlib.compress(forged)), dtype=torch.uint8)
    header = json.loads(meta["clcalib"])
    header["graph"]["bytes"] = len(forged)
    save_file(tensors, str(tmp_path / "forged.safetensors"), {**meta, "clcalib": json.dumps(header)})
    with pytest.raises(ExportError, match="relu_.default' is not functional"):
        load_quantized(tmp_path / "forged.safetensors")
    assert load_quantized(path)(torch.zeros(2, 3, 16, 16)).shape == (2, 10)  # the file as written loads


def _pt2(model, x, dynamic=True) -> bytes:
    dyn = ({0: torch.export.Dim("batch")},) if dynamic else None
    return program_to_bytes(torch.export.export(model.eval(), (x,), dynamic_shapes=dyn))


def _rewrite(data: bytes, member_suffix: str, payload: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, payload if info.filename.endswith(member_suffix) else zin.read(info))
    return out.getvalue()


class Marker:  # a pickled object of a class torch's safe loader does not allow
    def __reduce__(self):
        return (print, ("pickle ran",))


def test_bad_programs_are_refused_before_any_pickle_runs(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    good = _pt2(SkipNet(), x)
    check_archive(good)  # a plain program passes
    with pytest.raises(BadProgram, match="not a zip file"):
        program_from_bytes(b"not a program at all")
    buf = io.BytesIO()
    torch.save({"a": Marker()}, buf)
    program_from_bytes(_rewrite(good, "sample_inputs/model.pt", buf.getvalue()))  # never read (tests/test_pt2_reader.py)
    cfg = json.dumps({"config": {"w": {"path_name": "weight_0", "use_pickle": True}}}).encode()
    with pytest.raises(BadProgram, match="use_pickle=True.* which loading would unpickle"):
        program_from_bytes(_rewrite(good, "model_weights_config.json", cfg))
    extra = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as zin, zipfile.ZipFile(extra, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
        zout.writestr("archive/data/constants/custom_obj_0", buf.getvalue())
    with pytest.raises(BadProgram, match="members a plain exported program does not have"):
        program_from_bytes(extra.getvalue())


def test_models_the_graph_cannot_take_are_refused_with_the_reason():
    class DataDependent(SkipNet):
        def forward(self, x):
            return self.head(x.mean((2, 3)).repeat(1, 6)[:, :16]) if x.sum() > 0 else self.head(torch.zeros(len(x), 16))

    with pytest.raises(UnsupportedModel, match="control flow depends on the input"):
        clcalib.calibrate(DataDependent(), torch.randn(8, 3, 16, 16), dict(iters=1, device="cpu"))
    static = program_from_bytes(_pt2(SkipNet(), torch.randn(2, 3, 16, 16), dynamic=False))
    with pytest.raises(UnsupportedModel, match="dynamic batch"):
        clcalib.calibrate(static, torch.randn(8, 3, 16, 16), dict(iters=1, device="cpu"))

    class NoLayers(nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    with pytest.raises(UnsupportedModel, match="no Conv2d or Linear"):
        clcalib.calibrate(NoLayers(), torch.randn(8, 3, 16, 16), dict(iters=1, device="cpu"))


def test_cli_calibrates_an_exported_program_on_real_images(tmp_path, reference):
    """The reference resnet18 exported as a .pt2: inspect it, calibrate it, evaluate the saved
    checkpoint and export it: the reported accuracy is reproduced by the checkpoint."""
    model = reference("resnet18")
    (tmp_path / "m.pt2").write_bytes(_pt2(model, torch.randn(2, 3, 28, 28)))
    calib = write_zip(tmp_path / "calib.zip", "train", calibration_indices(64, seed=0), by_class=False)
    evalz = write_zip(tmp_path / "eval.zip", "t10k", range(300), by_class=True)
    pre = ["--resize", "none", "--crop", "none", "--mean", "0.286", "--std", "0.353"]

    r = run_cli("inspect", "--model", tmp_path / "m.pt2", "--json")
    assert r.returncode == 0, r.stderr
    units = json.loads(r.stdout)
    assert [u["unit"] for u in units][:3] == ["conv1", "layer1.0", "layer1.1"] and len(units) == 10
    r = run_cli("calibrate", "--model", tmp_path / "m.pt2", "--calib", calib, "--eval", evalz, "--out", tmp_path / "out",
            "--iters", "10", "--w-bits", "4", "--a-bits", "8", "--device", "cpu", "--export", "onnx", *pre)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["metrics"]["quant_top1"] > 80
    r = run_cli("evaluate", "--checkpoint", tmp_path / "out" / "quantized.safetensors", "--eval", evalz, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["quant_top1"] == pytest.approx(report["metrics"]["quant_top1"])
    # the default target adds 8-bit codes where the calibration kept float (residual sums; ranges
    # from these 64 images): 98.7 % on these 300 images, where the exact reference file gives 100
    assert report["metrics"]["onnx_top1_agreement"] >= 98.0
    r = run_cli("calibrate", "--model", tmp_path / "m.pt2", "--arch", "resnet18", "--calib", calib, "--out", tmp_path / "x")
    assert r.returncode != 0 and "not both" in r.stderr and "Traceback" not in r.stderr
    assert REFERENCE.is_dir()


def test_cl_calib_reaches_through_the_graph_of_a_transformer():
    """The FP tail after the patch embedding needs the batch size, which the captured graph read
    from the model's input: the graph path reads it from the values the tail has instead."""
    torch.manual_seed(0)
    model = _tiny_vit().eval()
    data = torch.randn(32, 3, 32, 32)
    res = clcalib.calibrate(model, data, dict(iters=2, calib_size=32, batch_size=8, device="cpu",
                                              cl_calib={"enabled": True, "mapping": "fp_tail"}))
    assert "cl" in res.units[0].extra and "cl" in res.units[1].extra
    top = res.model.model.graph
    x = next(n for n in top.nodes if n.op == "placeholder")
    assert [u.target for u in x.users] == ["conv_proj"]  # nothing after the first unit reads the input


class FlipNet(SkipNet):  # a mirrored feature map: flip has no ONNX translation (roll has one now)
    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.b(torch.flip(torch.relu(self.a(x)), dims=(2,))))
        return self.head(x.mean((2, 3)))


def test_an_export_that_cannot_succeed_is_refused_before_calibrating(tmp_path):
    """Issue 30: `clcalib calibrate --export onnx` names the op in seconds, before any unit is spent."""
    torch.manual_seed(0)
    (tmp_path / "roll.pt2").write_bytes(_pt2(FlipNet(), torch.randn(2, 3, 16, 16)))
    import numpy as np

    np.save(tmp_path / "calib.npy", torch.randn(16, 3, 16, 16).numpy())
    r = run_cli("calibrate", "--model", tmp_path / "roll.pt2", "--calib", tmp_path / "calib.npy", "--out", tmp_path / "out",
                "--iters", "1", "--device", "cpu", "--export", "onnx", "--quiet")
    assert r.returncode == 2, r.stderr
    assert "'flip.default' has no ONNX export here" in r.stderr and "Leave \"onnx\" out of config.export" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out" / "quantized.safetensors").exists()


def test_a_late_export_failure_keeps_the_calibration(tmp_path, monkeypatch):
    """If the export still fails after calibration, the checkpoint and report are written and the
    failure is a warning in the report (metrics.export_error), not a lost run."""
    import numpy as np

    import clcalib.export.onnx_check as onnx_check
    from clcalib.pipeline import run_calibration

    def broken(*args, **kwargs):
        raise ExportError("ONNX Runtime agrees with the torch model on only 3 % of images")

    monkeypatch.setattr(onnx_check, "export_checked", broken)
    torch.manual_seed(0)
    (tmp_path / "m.pt2").write_bytes(_pt2(SkipNet(), torch.randn(2, 3, 16, 16)))
    np.save(tmp_path / "calib.npy", torch.randn(16, 3, 16, 16).numpy())
    seen = []
    report = run_calibration(model=tmp_path / "m.pt2", calibration=tmp_path / "calib.npy", out_dir=tmp_path / "out",
                             config=CalibConfig(iters=1, calib_size=16, batch_size=8, device="cpu", export=["onnx"]),
                             on_progress=lambda e: seen.append(e))
    m = report["metrics"]
    assert "agrees with the torch model on only 3 %" in m["export_error"] and report["onnx"] is None
    assert any("ONNX export failed after calibration" in w for w in m["warnings"])
    assert any(e.stage == "warning" and "ONNX export failed" in e.message for e in seen)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["metrics"]["export_error"] == m["export_error"]
    assert load_quantized(tmp_path / "out" / "quantized.safetensors") is not None
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_a_programs_fixed_input_size_is_the_default_preprocessing(tmp_path):
    """Issue 30: a .pt2 fixes its input size; without resize/crop the run uses it (and says so),
    and a program asking for absurdly large images is refused by name."""
    from clcalib.config import Preprocess
    from clcalib.graph.program import preprocess_for_program
    from clcalib.pipeline import run_calibration

    torch.manual_seed(0)
    (tmp_path / "m.pt2").write_bytes(_pt2(SkipNet(), torch.randn(2, 3, 16, 16)))
    calib = write_zip(tmp_path / "calib.zip", "train", calibration_indices(16, seed=0), by_class=False)  # 28 px
    cfg = CalibConfig.model_validate({"iters": 1, "calib_size": 16, "batch_size": 8, "device": "cpu",
                                      "preprocess": {"mean": 0.286, "std": 0.353}})
    report = run_calibration(model=tmp_path / "m.pt2", calibration=calib, out_dir=tmp_path / "out", config=cfg)
    assert (report["config"]["preprocess"]["resize"], report["config"]["preprocess"]["crop"]) == (16, 16)
    assert report["notes"] == ["preprocessing resize 16, crop 16 taken from the program's input size (3x16x16), "
                               "as config.preprocess did not set resize or crop"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "taken from the program" in html
    # what is off says "off" (no CL-Calib or PD-Quant fields); layers are named as inspect names them
    assert "cl_calib.enabled" not in html and "pdquant." not in html and ">off<" in html
    assert report["layers"] and not any(".body" in layer["name"] for layer in report["layers"])
    assert {layer["name"] for layer in report["layers"]} >= {"a_block.a", "a_block.b"}
    program = program_from_bytes((tmp_path / "m.pt2").read_bytes())
    given = Preprocess(resize=20, crop=16)
    assert preprocess_for_program(program, given, {"resize", "crop"}) == (given, None)  # the user's choice stays

    class Huge(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 10)

        def forward(self, x):
            return self.fc(x.mean((2, 3)))

    huge = torch.export.export(Huge(), (torch.zeros(2, 3, 5000, 5000),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with pytest.raises(UnsupportedModel, match="3x5000x5000 images, larger than the 4096 px"):
        preprocess_for_program(huge, Preprocess(), set())


def test_a_program_given_as_weights_says_what_it_is(tmp_path):
    """Issue 30: a .pt2 given with --arch was answered by torch's truncated unpickling error."""
    (tmp_path / "vit.pt2").write_bytes(_pt2(SkipNet(), torch.randn(2, 3, 16, 16)))
    r = run_cli("calibrate", "--arch", "resnet18", "--num-classes", "10", "--weights", tmp_path / "vit.pt2",
                "--calib", tmp_path / "none.zip", "--out", tmp_path / "out")
    assert r.returncode == 2 and "vit.pt2: this is a torch.export program (.pt2)" in r.stderr, r.stderr
    assert "give it with --model" in r.stderr and "without an arch" in r.stderr


class TwoHeads(SkipNet):  # DeiT's / LeViT's distillation heads, averaged in eval
    def __init__(self):
        super().__init__()
        self.head_dist = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.b(torch.relu(self.a(x)))).mean((2, 3))
        return (self.head(x) + self.head_dist(x)) / 2


def test_distillation_heads_are_the_classifier(tmp_path):
    """Issue 30 (zoo): deit_tiny_distilled and levit end in two Linear heads whose logits are
    averaged; both are the classifier (8-bit weights, FP logits), and the model exports."""
    from clcalib.export.onnx_check import session
    from clcalib.export.onnx_qdq import export_onnx

    torch.manual_seed(0)
    model, data = TwoHeads().eval(), torch.randn(32, 3, 16, 16)
    result = clcalib.calibrate(model, data, CalibConfig(iters=1, calib_size=32, batch_size=8, device="cpu", a_bits=8),
                               on_progress=lambda e: None)
    last = result.model.units()[-1]
    assert sorted(h.wq.bits for h in last.layers()) == [8, 8] and last.output_quantizer() is None
    export_onnx(result.model, tmp_path / "q.onnx", (1, 3, 16, 16), target="reference")  # exact: compared below
    got = torch.from_numpy(session(tmp_path / "q.onnx").run(None, {"input": data[:8].numpy()})[0])
    with torch.no_grad():
        ref = result.model(data[:8])
    assert torch.allclose(got, ref, atol=0.02 * float(ref.abs().max()))
