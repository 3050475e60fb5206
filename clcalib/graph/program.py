"""A model as a torch.export program: captured from an ``nn.Module``, or read from an untrusted
``.pt2`` file by our own reader (``clcalib.graph.pt2_reader``: nothing in the file is unpickled,
compiled or evaluated, and its graph is checked against ``clcalib.graph.op_allowlist``).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from torch import fx, nn

from clcalib.errors import UnsupportedModel
from clcalib.graph.pt2_reader import BadProgram, build_program, read_archive

__all__ = ["BadProgram", "check_archive", "read_program", "program_from_bytes", "program_to_bytes", "capture",
           "as_program", "graph_module", "num_outputs", "input_size", "preprocess_for_program"]


def check_archive(data: bytes, name: str = "model.pt2") -> None:
    """Raise BadProgram unless ``data`` is a .pt2 archive of plain tensors and an allowed graph."""
    read_archive(data, name)


def read_program(path: str | Path) -> torch.export.ExportedProgram:
    """An ExportedProgram from a ``.pt2`` file, read by ``pt2_reader``."""
    path = Path(path)
    if not path.is_file():
        raise BadProgram(f"{path}: no such file")
    return program_from_bytes(path.read_bytes(), path.name)


def program_from_bytes(data: bytes, name: str = "model.pt2", decomposed: bool = False) -> torch.export.ExportedProgram:
    """``decomposed``: a graph clcalib stored in a checkpoint (see ``op_allowlist.DECOMPOSED``)."""
    parts = read_archive(data, name, decomposed)
    quiet = logging.getLogger("torch._export.serde.serialize")  # warns of unused size symbols
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return build_program(parts, name)
    finally:
        quiet.setLevel(level)


def num_outputs(ep: torch.export.ExportedProgram) -> int:
    """The size of the program's last output dimension: its number of classes."""
    out = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    val = (out[0] if isinstance(out, (tuple, list)) else out).meta.get("val")
    if val is None or val.dim() != 2 or not isinstance(val.shape[1], int):
        raise UnsupportedModel(f"the program's output is {tuple(val.shape) if val is not None else 'unknown'}; "
                               "clcalib calibrates classifiers returning N x classes logits")
    return int(val.shape[1])


def input_size(ep: torch.export.ExportedProgram) -> tuple[int, ...] | None:
    """C x H x W of the program's image input when fixed (a dynamic height/width: None)."""
    names = [s.arg.name for s in ep.graph_signature.input_specs
             if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    ph = next((n for n in ep.graph.nodes if n.op == "placeholder" and names and n.name == names[0]), None)
    val = ph.meta.get("val") if ph is not None else None
    if val is None or val.dim() != 4 or not all(isinstance(d, int) for d in val.shape[1:]):
        return None
    return tuple(int(d) for d in val.shape[1:])


def preprocess_for_program(ep: torch.export.ExportedProgram, preprocess, given: set[str]):
    """(preprocess, note): a program whose input is a fixed square H x H sets ``resize`` and
    ``crop`` to H wherever the user gave neither (``given``: the preprocess fields set by the
    user); the note says so, for the report. Sizes are validated like a user's (at most 4096 px)."""
    from pydantic import ValidationError

    size = input_size(ep)
    if size is None or len(size) != 3:
        return preprocess, None
    c, h, w = size
    if h != w:  # resize/crop make square images: the user must choose, the error names the size
        return preprocess, None
    update = {k: h for k in ("resize", "crop") if k not in given and getattr(preprocess, k) != h}
    if not update:
        return preprocess, None
    try:
        new = type(preprocess).model_validate({**preprocess.model_dump(), **update})
    except ValidationError:
        raise UnsupportedModel(f"the program takes {c}x{h}x{w} images, larger than the 4096 px clcalib "
                               "preprocesses images to") from None
    note = (f"preprocessing {', '.join(f'{k} {v}' for k, v in update.items())} taken from the program's input "
            f"size ({c}x{h}x{w}), as config.preprocess did not set {' or '.join(update)}")
    return new, note


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


def as_program(model, example: torch.Tensor, decomposed: bool = False) -> torch.export.ExportedProgram:
    """``model`` (an nn.Module or an ExportedProgram) as a functional ATen program (no in-place
    ops, BatchNorm in inference form, dropout gone), checked to take one image batch of any size.
    ``decomposed``: a program this function made earlier, stored in a checkpoint: in ATen form
    already (torch's verifier checked that when it was read), it is not traced again (seconds)."""
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
        c, h, w = (int(d) for d in val.shape[1:])
        fix = (f"set config.preprocess resize {h} and crop {h} (--resize {h} --crop {h}), or leave both unset: a "
               "program's input size is their default") if h == w else f"send a tensor of {c}x{h}x{w} images"
        raise UnsupportedModel(f"the program takes images of {c}x{h}x{w}, the data comes out as "
                               f"{'x'.join(map(str, example.shape[1:]))}; {fix}")
    try:
        if not (decomposed and all(v.dialect == "ATEN" for v in ep.verifiers)):
            ep = ep.run_decompositions({})
    except Exception as e:
        raise UnsupportedModel(f"the program could not be made functional ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    from clcalib.graph.op_allowlist import UnsafeCall, checked_interpreter

    try:  # the kernels that trust their arguments' shapes, checked once with real tensors
        with torch.no_grad():
            checked_interpreter()(ep.module()).run(example[:1].float().to(_device(ep)))
    except UnsafeCall as e:
        raise UnsupportedModel(f"the program is refused: {e}") from None
    except Exception:  # the model does not run on this input: said later, with the reason, by its first use
        pass
    random = sorted({str(n.target) for n in ep.graph.nodes if n.op == "call_function" and _is_random(n)})
    if random:  # a calibration target that changes from call to call cannot be reconstructed
        raise UnsupportedModel(f"the model's forward draws random numbers ({', '.join(random[:3])}): dropout in "
                               "training mode or noise; export it in eval mode without them")
    return ep


def _device(ep: torch.export.ExportedProgram) -> torch.device:
    return next((t.device for t in ep.state_dict.values()), torch.device("cpu"))


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
