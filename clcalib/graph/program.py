"""A model as a torch.export program: captured from an ``nn.Module``, or read from an untrusted
``.pt2`` file without running any of its pickles.

``torch.export.load`` unpickles with ``weights_only=False`` in three places: weights and
constants marked ``use_pickle`` (tensor subclasses), custom objects under ``data/constants``,
and the sample inputs (it retries with ``weights_only=False`` when the safe load fails). So
``read_program`` first checks the archive itself: only the member names a plain program has,
bounded sizes, no pickled payload, and sample inputs that load with ``weights_only=True``. Only
then does torch read it.
"""

from __future__ import annotations

import io
import json
import logging
import re
import zipfile
from pathlib import Path

import torch
from torch import fx, nn

from clcalib.errors import UnsupportedModel

MAX_MEMBERS = 20_000
MAX_UNPACKED_BYTES = 4 << 30  # a program's weights, unpacked: 4 GiB is beyond any model we calibrate
MAX_JSON_BYTES = 256 << 20

# what torch.export.save writes for a plain program (prefix: the archive's own folder name)
_ALLOWED = re.compile(
    r"[^/]+/("
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[\w.-]+\.json"
    r"|data/weights/[\w.-]+\.json|data/weights/weight_\d+"
    r"|data/constants/[\w.-]+\.json|data/constants/tensor_\d+"
    r"|data/sample_inputs/[\w.-]+\.pt"
    r")"
)


class BadProgram(UnsupportedModel):
    """The upload is not a .pt2 program this clcalib reads safely."""


def _refuse(name: str, why: str) -> BadProgram:
    return BadProgram(f"{name}: {why}. Save the model with torch.export.save(torch.export.export(model.eval(), "
                      "(example,)), 'model.pt2') from plain tensors (no custom objects or tensor subclasses)")


def check_archive(data: bytes, name: str = "model.pt2") -> None:
    """Raise BadProgram unless ``data`` is a .pt2 archive whose loading runs no pickle."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise _refuse(name, f"not a torch.export archive (not a zip file: {e})") from None
    if len(infos) > MAX_MEMBERS:
        raise _refuse(name, f"{len(infos)} archive members (at most {MAX_MEMBERS})")
    if sum(i.file_size for i in infos) > MAX_UNPACKED_BYTES:
        raise _refuse(name, f"unpacks to more than {MAX_UNPACKED_BYTES >> 30} GiB")
    names = [i.filename for i in infos]
    odd = [n for n in names if not _ALLOWED.fullmatch(n)]
    if odd:
        shown = ", ".join(repr(n[:80]) for n in odd[:3])
        raise _refuse(name, f"it holds members a plain exported program does not have ({shown}): custom objects, "
                            "compiled code or another kind of archive")
    if not any("/models/" in n for n in names):
        raise _refuse(name, "no exported program inside (no models/*.json)")
    for info in infos:
        n = info.filename
        if n.endswith("_config.json"):
            if info.file_size > MAX_JSON_BYTES:
                raise _refuse(name, f"{n[:80]} is larger than {MAX_JSON_BYTES >> 20} MiB")
            try:
                entries = json.loads(zf.read(info)).get("config", {})
            except (ValueError, AttributeError) as e:
                raise _refuse(name, f"{n[:80]} is not valid JSON ({e})") from None
            pickled = [k for k, v in entries.items() if not isinstance(v, dict) or v.get("use_pickle") is not False]
            if pickled:
                raise _refuse(name, f"{len(pickled)} pickled payload(s) ({pickled[0][:80]!r}, ...), which loading "
                                    "would unpickle with code execution allowed")
        elif n.endswith(".pt") and info.file_size:  # sample inputs: torch retries unsafely when the safe load fails
            try:
                torch.load(io.BytesIO(zf.read(info)), weights_only=True)
            except Exception:
                raise _refuse(name, f"its sample inputs ({n[:80]}) hold pickled objects beyond plain tensors") from None


def read_program(path: str | Path) -> torch.export.ExportedProgram:
    """An ExportedProgram from a ``.pt2`` file, checked first by ``check_archive``."""
    path = Path(path)
    if not path.is_file():
        raise BadProgram(f"{path}: no such file")
    data = path.read_bytes()
    return program_from_bytes(data, path.name)


def program_from_bytes(data: bytes, name: str = "model.pt2") -> torch.export.ExportedProgram:
    check_archive(data, name)
    quiet = logging.getLogger("torch._export.serde.serialize")  # warns of unused size symbols
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        ep = torch.export.load(io.BytesIO(data))
    except Exception as e:  # a damaged or version-incompatible program
        raise _refuse(name, f"torch.export.load failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    finally:
        quiet.setLevel(level)
    if not isinstance(ep, torch.export.ExportedProgram):
        raise _refuse(name, f"holds a {type(ep).__name__}, not an ExportedProgram")
    return ep


def num_outputs(ep: torch.export.ExportedProgram) -> int:
    """The size of the program's last output dimension: its number of classes."""
    out = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    val = (out[0] if isinstance(out, (tuple, list)) else out).meta.get("val")
    if val is None or val.dim() != 2 or not isinstance(val.shape[1], int):
        raise UnsupportedModel(f"the program's output is {tuple(val.shape) if val is not None else 'unknown'}; "
                               "clcalib calibrates classifiers returning N x classes logits")
    return int(val.shape[1])


def program_to_bytes(ep: torch.export.ExportedProgram) -> bytes:
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()


def capture(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """Export a float model in eval mode with a dynamic batch dimension (data-dependent control
    flow is refused by torch.export, with the line that has it)."""
    was_training = model.training
    model.eval()
    example = example[:2].float()
    if len(example) < 2:  # torch.export specialises a batch of 1
        example = torch.cat([example, example])
    try:
        dev = next(iter(model.parameters()), torch.empty(0)).device
        return torch.export.export(model, (example.to(dev),),
                                   dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 20)},))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UnsupportedModel(
            f"torch.export cannot capture {type(model).__name__} ({type(e).__name__}: {first}). A forward whose "
            "control flow depends on the input's values cannot be captured; rewrite it with torch.cond or "
            "tensor operations, or export it yourself and pass the .pt2"
        ) from None
    finally:
        model.train(was_training)


def as_program(model, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``model`` (an nn.Module or an ExportedProgram) as a functional ATen program (no in-place
    ops, BatchNorm in inference form, dropout gone), checked to take one image batch of any size."""
    ep = model if isinstance(model, torch.export.ExportedProgram) else capture(model, example)
    sig = ep.graph_signature
    user_inputs = [s for s in sig.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    if len(user_inputs) != 1 or len(sig.user_outputs) != 1:
        raise UnsupportedModel(f"the program takes {len(user_inputs)} inputs and returns {len(sig.user_outputs)} "
                               "outputs; clcalib calibrates a classifier that maps one image batch to one logits tensor")
    ph = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0].arg.name)
    val = ph.meta.get("val")
    if val is None or val.dim() != 4 or isinstance(val.shape[0], int):
        shape = tuple(val.shape) if val is not None else "unknown"
        raise UnsupportedModel(
            f"the program's input has shape {shape}; clcalib needs an N x C x H x W input with a dynamic batch "
            "dimension: torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},))")
    if tuple(int(d) for d in val.shape[1:]) != tuple(example.shape[1:]):
        raise UnsupportedModel(f"the program takes images of shape {tuple(int(d) for d in val.shape[1:])}, "
                               f"the data has {tuple(example.shape[1:])}; check the preprocessing (resize/crop)")
    try:
        ep = ep.run_decompositions({})
    except Exception as e:
        raise UnsupportedModel(f"the program could not be made functional ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    random = sorted({str(n.target) for n in ep.graph.nodes if n.op == "call_function" and _is_random(n)})
    if random:  # a calibration target that changes from call to call cannot be reconstructed
        raise UnsupportedModel(f"the model's forward draws random numbers ({', '.join(random[:3])}): dropout in "
                               "training mode or noise; export it in eval mode without them")
    return ep


def _is_random(node: fx.Node) -> bool:
    """An op that draws random numbers here (attention or dropout with p = 0 or train off does not)."""
    if torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()):
        return False
    from torch.fx.operator_schemas import normalize_function

    norm = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    kw = norm.kwargs if norm is not None else {}
    return not (kw.get("train") is False or kw.get("dropout_p", kw.get("p")) == 0)


def graph_module(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """The program as a runnable GraphModule (a fresh one each call)."""
    gm = ep.module()
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm
