"""An uploaded .pt2 is data (issue 24): our reader never unpickles, compiles or evaluates what is
in the file, and a graph may only call the allowlisted compute ops. Each attack below is a class
the loader of torch itself falls for; each is refused by name and its payload never runs."""

import io
import json
import pickle
import zipfile

import pytest
import torch
import torchvision
from torch import nn

from clcalib.graph import op_allowlist
from clcalib.graph.program import BadProgram, program_from_bytes, program_to_bytes


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)) + torch.tensor([0.5]))


@pytest.fixture(scope="module")
def good() -> bytes:
    torch.manual_seed(0)
    ep = torch.export.export(Net().eval(), (torch.randn(2, 3, 8, 8),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    return program_to_bytes(ep)


class Payload:
    """Unpickling it creates the marker file: proof that the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {n: z.read(n) for n in z.namelist()}


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    return out.getvalue()


def _edit_json(data: bytes, suffix: str, edit) -> bytes:
    m = _members(data)
    name = next(n for n in m if n.endswith(suffix))
    obj = json.loads(m[name])
    edit(obj)
    m[name] = json.dumps(obj).encode()
    return _zip(m)


def _nodes(program: dict) -> list:
    return program["graph_module"]["graph"]["nodes"]


def test_a_plain_program_reads_back_computing_the_same(good):
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(program_from_bytes(good).module()(x), torch.export.load(io.BytesIO(good)).module()(x))


@pytest.mark.parametrize("net", ["resnet18", "swin_t", "vit"])
def test_torchvision_programs_pass_the_allowlist(net):
    """Convolutional, window-attention (in-place fills of fresh masks, roll) and ViT graphs."""
    model = (torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                                  hidden_dim=16, mlp_dim=32, num_classes=4)
             if net == "vit" else getattr(torchvision.models, net)(num_classes=4))
    size = 64 if net == "swin_t" else 32
    x = torch.randn(2, 3, size, size)
    ep = torch.export.export(model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert torch.equal(program_from_bytes(program_to_bytes(ep)).module()(x), ep.module()(x))


def test_opaque_and_custom_object_constants_are_refused_unread(good, tmp_path):
    marker = tmp_path / "ran"
    blob = pickle.dumps(Payload(marker))
    for path_name, member in [("opaque_obj_0", "opaque_obj_0.json"), ("opaque_obj_0", "tensor_9"),
                              ("custom_obj_0", "tensor_9"), ("tensor_9", "tensor_9")]:
        m = _members(good)
        prefix = next(iter(m)).split("/")[0]
        cfg_name = next(n for n in m if n.endswith("constants_config.json"))
        cfg = json.loads(m[cfg_name])
        cfg["config"]["evil"] = {"path_name": path_name, "is_param": False,
                                 "use_pickle": path_name == "tensor_9", "tensor_meta": None}
        m[cfg_name] = json.dumps(cfg).encode()
        m[f"{prefix}/data/constants/{member}"] = blob
        with pytest.raises(BadProgram) as e:
            program_from_bytes(_zip(m))
        assert ("opaque_obj_0.json" in str(e.value) and "members" in str(e.value)) or "'evil'" in str(e.value)
    assert not marker.exists()


def test_pickled_sample_inputs_are_never_read(good, tmp_path):
    marker = tmp_path / "ran"
    m = _members(good)
    buf = io.BytesIO()
    torch.save({"x": Payload(marker)}, buf)
    m[next(n for n in m if n.endswith("sample_inputs/model.pt"))] = buf.getvalue()
    program_from_bytes(_zip(m))  # the program itself is plain: it loads
    assert not marker.exists()


def test_file_ops_in_the_graph_are_refused_by_name(good):
    def to_from_file(p):
        node = _nodes(p)[0]
        node["target"] = "torch.ops.aten.from_file.default"
        node["inputs"] = [{"name": "filename", "arg": {"as_string": "/etc/passwd"}, "kind": 1},
                          {"name": "shared", "arg": {"as_bool": True}, "kind": 1}]
    with pytest.raises(BadProgram, match=r"aten\.from_file\.default is not on the allowlist"):
        program_from_bytes(_edit_json(good, "models/model.json", to_from_file))

    def to_python(p):
        _nodes(p)[0]["target"] = "torch.save"
    with pytest.raises(BadProgram, match=r"op torch\.save is not on the allowlist"):
        program_from_bytes(_edit_json(good, "models/model.json", to_python))


def test_in_place_writes_to_weights_are_refused_but_not_to_fresh_tensors(good):
    def fill_weight(p):
        node = _nodes(p)[0]  # conv2d(x, weight, bias) -> fill_(weight, 0)
        node["target"] = "torch.ops.aten.fill_.Scalar"
        node["inputs"] = [node["inputs"][1], {"name": "value", "arg": {"as_float": 0.0}, "kind": 1}]
    with pytest.raises(BadProgram, match=r"fill_\.Scalar writes in place to 'p_conv_weight'"):
        program_from_bytes(_edit_json(good, "models/model.json", fill_weight))

    def relu_in_place(p):  # relu_ on the conv's own output is what torch.export emits for nn.ReLU(inplace)
        relu = next(n for n in _nodes(p) if n["target"] == "torch.ops.aten.relu.default")
        relu["target"] = "torch.ops.aten.relu_.default"
    program_from_bytes(_edit_json(good, "models/model.json", relu_in_place))


def test_code_in_size_expressions_and_guards_is_refused(good, tmp_path):
    marker = tmp_path / "ran"

    def evil_expr(p):
        vals = p["graph_module"]["graph"]["tensor_values"]
        first = next(iter(vals.values()))
        first["sizes"][0] = {"as_expr": {"expr_str": f"__import__('os').mkdir('{marker}')", "hint": None}}
    with pytest.raises(BadProgram, match="symbolic size .* not plain arithmetic"):
        program_from_bytes(_edit_json(good, "models/model.json", evil_expr))

    def guard(p):
        p["guards_code"] = [f"__import__('os').mkdir('{marker}')"]
    with pytest.raises(BadProgram, match="Python guard code"):
        program_from_bytes(_edit_json(good, "models/model.json", guard))
    assert not marker.exists()
    for expr in ["Pow(Integer(9), Integer(999999999))", "9**9**9", "Symbol('s1').__class__", "open('x')",
                 "((1<<4194304)-1)*7", "9" * 26 + "x"]:
        assert not op_allowlist.plain_size_expression(expr), expr
    for expr in ["Symbol('s77', positive=True, integer=True)", "Mul(Integer(4), Symbol('s7', integer=True))",
                 "Min(Integer(64), Mul(Integer(64), s77))", "2*s0 + 1 <= s1"]:
        assert op_allowlist.plain_size_expression(expr), expr


def test_bad_tensor_payloads_are_refused(good):
    def widen(cfg):  # a weight that claims more elements than its file holds: reading past it
        entry = cfg["config"]["conv.weight"]
        entry["tensor_meta"]["sizes"][0] = {"as_int": 10_000}
    with pytest.raises(BadProgram, match="needs .* elements, its file holds"):
        program_from_bytes(_edit_json(good, "weights_config.json", widen))

    def complex_dtype(cfg):
        cfg["config"]["conv.weight"]["tensor_meta"]["dtype"] = 10  # complex64
    with pytest.raises(BadProgram, match="has dtype torch.complex"):
        program_from_bytes(_edit_json(good, "weights_config.json", complex_dtype))


def _file_ops() -> list[str]:
    """Every registered op with a string argument that names a file or a path (einsum's integer
    contraction ``path`` is not one)."""
    out = []
    for schema in torch._C._jit_get_all_schemas():
        if any(w in a.name.lower() and "str" in str(a.type).lower() for a in schema.arguments for w in ("file", "path")):
            ns, name = schema.name.split("::", 1)
            out.append(f"torch.ops.{ns}.{name}.{schema.overload_name or 'default'}")
    return out


def test_no_op_that_takes_a_file_name_or_path_is_allowed():
    ops = _file_ops()
    assert "torch.ops.aten.from_file.default" in ops  # the walk finds the op of the attack
    allowed = [t for t in ops if op_allowlist.target_allowed(t)]
    assert not allowed, allowed


class KeyValue(nn.Module):
    def forward(self, x):
        t = x.flatten(2).transpose(1, 2).unsqueeze(1)  # N, 1, HW, C
        return torch.nn.functional.scaled_dot_product_attention(t, t[:, :, :2], t[:, :, :2]).mean((1, 2))


def test_attention_whose_keys_and_values_disagree_is_refused_before_its_kernel_runs():
    """The values' slice widened to 4 rows in the JSON: the attention kernel takes the length from
    the values and would read key rows past the end of the keys (no shape check of torch's sees it)."""
    from clcalib.errors import UnsupportedModel
    from clcalib.graph.op_allowlist import UnsafeCall
    from clcalib.graph.program import as_program
    from clcalib.memory_estimate import activation_bytes

    x = torch.randn(2, 4, 2, 2)
    good = program_to_bytes(torch.export.export(KeyValue(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)))

    def widen_values(p):
        slices = [n for n in _nodes(p) if n["target"] == "torch.ops.aten.slice.Tensor"]
        end = next(i for i in slices[-1]["inputs"] if i["name"] == "end")
        end["arg"] = {"as_int": 4}
    ep = program_from_bytes(_edit_json(good, "models/model.json", widen_values))
    with pytest.raises(UnsafeCall, match="attention with query .* do not match.*would read outside"):
        activation_bytes(ep.module(), x)  # the upload check's forward pass
    with pytest.raises(UnsupportedModel):  # and calibration's conversion refuses it (here torch's decomposition)
        as_program(ep, x)
