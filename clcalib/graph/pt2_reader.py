"""Our own reader of an untrusted ``.pt2`` archive: the program's JSON, checked against the op
allowlist, and plain tensors built from raw bytes. Nothing in the file is ever unpickled,
compiled or evaluated.

``torch.export.load`` is not safe on a stranger's file. It unpickles weights and constants
marked ``use_pickle``, ``opaque_obj_*`` constants (plain ``pickle.loads``, whatever the config
says), ``custom_obj_*`` constants (TorchScript's unpickler) and sample inputs (retrying with
``weights_only=False``); it hands symbolic size strings to ``sympy.sympify``, which evaluates
Python; and ``ExportedProgram.module()`` compiles the program's ``guards_code``. So this module
reads the zip itself:

- members: only the names a plain program has (``_ALLOWED``), bounded count and sizes;
- weights and constants: each config entry must be a plain tensor (``weight_N`` / ``tensor_N``,
  ``use_pickle`` false, a dtype from ``DTYPES``, on the CPU, strides inside its bytes); its
  bytes become a tensor with ``torch.frombuffer``;
- the program: JSON, checked by ``op_allowlist.check_program`` (ops, in-place writes, guard
  code, custom objects, size expressions) before torch's deserializer sees it;
- sample inputs are never read.

Only then does torch's ``ExportedProgramDeserializer`` build the program from the checked JSON
and our tensors.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass

import torch

from clcalib.errors import UnsupportedModel
from clcalib.graph import op_allowlist

MAX_MEMBERS = 20_000
MAX_UNPACKED_BYTES = 4 << 30  # a program's weights, unpacked: 4 GiB is beyond any model we calibrate
MAX_JSON_BYTES = 256 << 20

# what torch.export.save writes for a plain program (prefix: the archive's own folder name)
_ALLOWED = re.compile(
    r"[^/]{1,100}/("
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[\w-]{1,100}\.json"
    r"|data/weights/[\w-]{1,100}_weights_config\.json|data/weights/weight_\d{1,6}"
    r"|data/constants/[\w-]{1,100}_constants_config\.json|data/constants/tensor_\d{1,6}"
    r"|data/sample_inputs/[\w-]{1,100}\.pt"
    r")"
)
_PAYLOAD = {"weights": re.compile(r"weight_\d{1,6}"), "constants": re.compile(r"tensor_\d{1,6}")}

DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64,
          torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool}


class BadProgram(UnsupportedModel):
    """The upload is not a .pt2 program this clcalib reads safely."""


def refuse(name: str, why: str) -> BadProgram:
    return BadProgram(f"{name}: {why}. Save the model with torch.export.save(torch.export.export(model.eval(), "
                      "(example,)), 'model.pt2') from plain tensors (no custom objects, tensor subclasses or "
                      "custom ops); the ops a graph may use are listed in docs/service.md")


@dataclass
class Parts:
    """A checked archive: the program's JSON and its tensors, ready for torch's deserializer."""
    program: dict
    state_dict: dict[str, torch.Tensor]
    constants: dict[str, torch.Tensor]


def read_archive(data: bytes, name: str = "model.pt2", decomposed: bool = False) -> Parts:
    """Check ``data`` as described in the module docstring; raise BadProgram naming the first
    thing that is not plain tensors and an allowed graph. ``decomposed``: the graph a clcalib
    checkpoint stores, which may hold the kernels ``run_decompositions`` makes (never an upload)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise refuse(name, f"not a torch.export archive (not a zip file: {e})") from None
    if len(infos) > MAX_MEMBERS:
        raise refuse(name, f"{len(infos)} archive members (at most {MAX_MEMBERS})")
    if sum(i.file_size for i in infos) > MAX_UNPACKED_BYTES:
        raise refuse(name, f"unpacks to more than {MAX_UNPACKED_BYTES >> 30} GiB")
    members = {i.filename: i for i in infos}
    if len(members) != len(infos):
        raise refuse(name, "it holds two members of the same name")
    odd = [n for n in members if not _ALLOWED.fullmatch(n)]
    if odd:
        shown = ", ".join(repr(n[:80]) for n in odd[:3])
        raise refuse(name, f"it holds members a plain exported program does not have ({shown}): custom objects, "
                           "compiled code or another kind of archive")
    models = [n for n in members if "/models/" in n]
    if len(models) != 1:
        raise refuse(name, f"{len(models)} programs inside (models/*.json); clcalib takes exactly one")
    prefix, model = models[0].split("/models/")
    model = model[: -len(".json")]
    byteorder = members.get(f"{prefix}/byteorder")
    if byteorder is not None and zf.read(byteorder).strip() not in (b"little", b""):
        raise refuse(name, "its tensors are stored big-endian")

    def read_json(member: str) -> dict:
        info = members.get(member)
        if info is None:
            raise refuse(name, f"{member[:80]} is missing")
        if info.file_size > MAX_JSON_BYTES:
            raise refuse(name, f"{member[:80]} is larger than {MAX_JSON_BYTES >> 20} MiB")
        try:
            obj = json.loads(zf.read(info))
        except (ValueError, RecursionError) as e:
            raise refuse(name, f"{member[:80]} is not valid JSON ({str(e)[:80]})") from None
        if not isinstance(obj, dict):
            raise refuse(name, f"{member[:80]} is not a JSON object")
        return obj

    program = read_json(models[0])
    problems = op_allowlist.check_program(program, decomposed)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise refuse(name, f"its graph is refused: {problems[0]}{more}")
    tensors = {}
    budget = [MAX_UNPACKED_BYTES]  # bytes the tensors may take, empty payloads (zero-filled) included
    for kind in ("weights", "constants"):
        config = read_json(f"{prefix}/data/{kind}/{model}_{kind}_config.json").get("config")
        if not isinstance(config, dict):
            raise refuse(name, f"its {kind} config has no 'config' object")
        tensors[kind] = _tensors(zf, members, f"{prefix}/data/{kind}/", kind, config, name, budget)
    return Parts(program, tensors["weights"], tensors["constants"])


def _tensors(zf: zipfile.ZipFile, members: dict, folder: str, kind: str, config: dict, name: str,
             budget: list[int]):
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    out: dict[str, torch.Tensor] = {}
    storages: dict[str, torch.Tensor] = {}  # one per payload file: tied weights keep sharing it
    for fqn, entry in config.items():
        what = f"{kind[:-1]} {str(fqn)[:80]!r}"
        if not isinstance(entry, dict):
            raise refuse(name, f"{what} has no payload description")
        path = entry.get("path_name")
        if entry.get("use_pickle") is not False or not isinstance(path, str) or not _PAYLOAD[kind].fullmatch(path):
            raise refuse(name, f"{what} is stored as {str(path)[:60]!r} (use_pickle={entry.get('use_pickle')!r}), "
                               "not as plain tensor bytes: a pickled object, custom object or tensor subclass, "
                               "which loading would unpickle")
        meta = entry.get("tensor_meta")
        try:
            dtype = _SERIALIZE_TO_TORCH_DTYPE[meta["dtype"]]
            sizes = [int(s["as_int"]) for s in meta["sizes"]]
            strides = [int(s["as_int"]) for s in meta["strides"]]
            offset = int(meta["storage_offset"]["as_int"])
            device = meta["device"]["type"]
        except (KeyError, TypeError, ValueError):
            raise refuse(name, f"{what} has no plain tensor description (dtype, sizes, strides, offset)") from None
        if dtype not in DTYPES:
            raise refuse(name, f"{what} has dtype {dtype}; programs hold {', '.join(sorted(map(str, DTYPES)))}")
        if device not in ("cpu", "cuda"):
            raise refuse(name, f"{what} is on device {str(device)[:20]!r}")
        if len(sizes) != len(strides) or min([*sizes, *strides, offset, 0]) < 0:
            raise refuse(name, f"{what} has sizes {sizes[:8]} and strides {strides[:8]} that do not describe a tensor")
        member = folder + path
        if member not in members:
            raise refuse(name, f"{what}: its bytes ({path}) are missing")
        if path not in storages:
            raw = bytearray(zf.read(members[member]))
            item = torch.empty((), dtype=dtype).element_size()
            if len(raw) % item:
                raise refuse(name, f"{what}: {len(raw)} bytes is not a whole number of {dtype} elements")
            storages[path] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        base = storages[path]
        if base.dtype != dtype:
            raise refuse(name, f"{what} reads {path} as {dtype}, another entry as {base.dtype}")
        extent = offset + sum((s - 1) * st for s, st in zip(sizes, strides, strict=True)) + 1 if all(sizes) else 0
        if extent > base.numel():
            if base.numel() == 0:  # torch.export.save writes no bytes for an all-zero-size or empty tensor
                budget[0] -= extent * base.element_size()
                if budget[0] < 0:
                    raise refuse(name, f"{what}: its tensors would take more than {MAX_UNPACKED_BYTES >> 30} GiB")
                base = storages[path] = torch.zeros(extent, dtype=dtype)
            else:
                raise refuse(name, f"{what} needs {extent} elements, its file holds {base.numel()}")
        t = torch.as_strided(base, sizes, strides, offset)
        grad = meta.get("requires_grad") is True and dtype.is_floating_point
        out[str(fqn)] = torch.nn.Parameter(t, requires_grad=grad) if entry.get("is_param") else t
    return out


def build_program(parts: Parts, name: str = "model.pt2") -> torch.export.ExportedProgram:
    """The ExportedProgram from checked parts (torch's deserializer, our tensors, no sample inputs)."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, parts.program)
        return ExportedProgramDeserializer().deserialize(serialized, parts.state_dict, parts.constants, None)
    except Exception as e:  # a damaged or version-incompatible program
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise refuse(name, f"torch could not build the program ({type(e).__name__}: {first})") from None
