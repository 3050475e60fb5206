"""Supported architectures by name, and loading user weights into them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clcalib.errors import ModelMismatchError

if TYPE_CHECKING:  # the API process lists archs without importing torch
    import torch
    from torch import nn


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[int], nn.Module]


def _tv(fn_name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, fn_name)(weights=None, num_classes=num_classes)

    return build


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch("resnet18", _tv("resnet18")),
        Arch("resnet34", _tv("resnet34")),
        Arch("resnet50", _tv("resnet50")),
        Arch("mobilenet_v2", _tv("mobilenet_v2")),
        Arch("regnet_x_400mf", _tv("regnet_x_400mf")),
        Arch("regnet_x_3_2gf", _tv("regnet_x_3_2gf")),
        Arch("mnasnet1_0", _tv("mnasnet1_0")),
    ]
}


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise ModelMismatchError(f"unknown arch {name!r}; known: {', '.join(ARCHS)}") from None


def _is_program(path: Path) -> bool:
    """A zip holding a torch.export program's graph (``models/<name>.json``), not torch.save's pickle."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/")[-2:-1] == ["models"] and n.endswith(".json") for n in z.namelist()[:10_000])
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from safetensors, or from a PyTorch file read with ``weights_only=True``
    (a pickle that carries code is refused by torch and never executed)."""
    path = Path(path)
    if not path.is_file():
        raise ModelMismatchError(f"{path}: no such weights file")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) == 8 and int.from_bytes(head, "little") < (100 << 20) and path.suffix != ".pt":
        try:
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        except Exception:
            pass  # not safetensors after all; try torch's format below
        else:
            return _checked(path, tensors)
    if _is_program(path):
        raise ModelMismatchError(
            f"{path.name}: this is a torch.export program (.pt2), not a state_dict for an arch; a program carries its "
            "own architecture: give it with --model (clcalib calibrate/inspect) or submit it without an arch "
            "(clcalib submit without --arch)")
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's message goes on to suggest weights_only=False, which would run the pickle's code
        text = str(e).strip()
        if "Weights only load failed" in text or "weights_only" in text:
            why = "it is a pickle that needs more than tensors (code or custom objects) to load"
        else:
            why = (text.splitlines() or [type(e).__name__])[0][:200]
        raise ModelMismatchError(
            f"{path.name}: not a safetensors file nor a plain PyTorch state_dict loadable with "
            f"weights_only=True: {why}. Save it with safetensors.torch.save_file(model.state_dict(), ...)"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelMismatchError(f"{path.name}: expected a dict of name -> tensor (a state_dict), got {type(obj).__name__}")
    return _checked(path, obj)


INTEGER_BUFFERS = ("num_batches_tracked",)  # BatchNorm's step counter: the one integer entry of a state_dict


def weight_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes a weight may have (an integer buffer may have any integer dtype)."""
    import torch

    return (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _checked(path: Path, obj: dict) -> dict[str, torch.Tensor]:
    """The state_dict, if it holds only string keys and plain dense CPU tensors of an allowed dtype:
    float32/float16/bfloat16/float64, and an integer dtype for BatchNorm's num_batches_tracked
    only. Anything else (float8, complex, integer or bool weights, sparse, nested, meta or
    quantized tensors) loads but breaks or means nothing later: refused here, by key and dtype."""
    import torch

    odd_keys = [repr(k)[:40] for k in obj if not isinstance(k, str)]
    if odd_keys:
        raise ModelMismatchError(f"{path.name}: state_dict keys must be strings, got {', '.join(odd_keys[:3])}")
    odd = [f"{k[:60]} ({'nested' if v.is_nested else v.layout}, {v.device.type}, {v.dtype})" for k, v in obj.items()
           if v.is_nested or v.layout is not torch.strided or v.device.type != "cpu" or v.is_quantized]
    if odd:  # sparse, nested, meta or quantized tensors load but break (or mean nothing) later
        raise ModelMismatchError(f"{path.name}: only plain dense float/integer tensors can be loaded; not "
                                 f"{', '.join(odd[:3])}. Save model.float().state_dict()")
    floats = weight_dtypes()
    wrong = [f"{k[:60]} ({str(v.dtype).removeprefix('torch.')})" for k, v in obj.items()
             if v.dtype not in floats and not (_integer_buffer(k) and _is_integer(v.dtype))]
    if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise ModelMismatchError(
            f"{path.name}: weights must be float32, float16, bfloat16 or float64 (an integer dtype only for "
            f"BatchNorm's num_batches_tracked); not {', '.join(wrong[:3])}{more}. Save model.float().state_dict()")
    return obj


def _integer_buffer(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in INTEGER_BUFFERS


def _is_integer(dtype) -> bool:
    import torch

    return not dtype.is_floating_point and not dtype.is_complex and dtype is not torch.bool


def _list(keys, n: int = 6) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def build_model(arch: str, num_classes: int, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The FP model in eval mode, float32; ``state_dict`` must fit it exactly."""
    if not 1 <= num_classes <= 100_000:
        raise ModelMismatchError(f"num_classes must be between 1 and 100000, got {num_classes}")
    import torch

    model = get_arch(arch).build(num_classes)
    if state_dict is not None:
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        own = model.state_dict()
        missing = own.keys() - state_dict.keys()
        unexpected = state_dict.keys() - own.keys()
        misshaped = [
            f"{k} (expected {tuple(own[k].shape)}, got {tuple(state_dict[k].shape)})"
            for k in own.keys() & state_dict.keys()
            if own[k].shape != state_dict[k].shape
        ]
        problems = []
        if missing:
            problems.append(f"missing keys: {_list(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_list(unexpected)}")
        if misshaped:
            problems.append(f"mis-shaped: {_list(misshaped, 4)}")
        nonfinite = [k for k in own.keys() & state_dict.keys()
                     if state_dict[k].is_floating_point() and state_dict[k].layout is torch.strided
                     and state_dict[k].device.type != "meta" and not bool(torch.isfinite(state_dict[k]).all())]
        if nonfinite:  # a diverged or damaged checkpoint: calibrating it would fail late and unclearly
            problems.append(f"NaN or infinite values in: {_list(nonfinite, 4)}")
        if problems:
            raise ModelMismatchError(
                f"the weights do not fit {arch}(num_classes={num_classes}): " + "; ".join(problems)
                + ". Check arch and num_classes, and upload model.state_dict()."
            )
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    return model.eval()
