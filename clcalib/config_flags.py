"""Command-line flags for ``CalibConfig`` fields, shared by ``clcalib calibrate`` and
``clcalib submit``. Each flag's type, choices, range, help and default come from the field in
``clcalib.config``, so the CLI says what the config says and cannot drift from it."""

from __future__ import annotations

import argparse
import types
import typing
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo

from clcalib.config import CalibConfig

# flag -> the config field it sets (dotted into the nested blocks; an alias where the field has one)
FLAGS: tuple[tuple[str, str], ...] = (
    ("--method", "method"),
    ("--w-bits", "w_bits"),
    ("--a-bits", "a_bits"),
    ("--first-last-bits", "first_last_bits"),
    ("--iters", "iters"),
    ("--batch-size", "batch_size"),
    ("--calib-size", "calib_size"),
    ("--seed", "seed"),
    ("--calib-seed", "calib_seed"),
    ("--device", "device"),
    ("--partition", "partition"),
    ("--act-placement", "act_placement"),
    ("--round-weight", "round_weight"),
    ("--drop-prob", "drop_prob"),
    ("--drop-scope", "drop_scope"),
    ("--export", "export"),
    ("--target", "export_target"),
    ("--w-symmetric", "w_symmetric"),
    ("--resize", "preprocess.resize"),
    ("--crop", "preprocess.crop"),
    ("--mean", "preprocess.mean"),
    ("--std", "preprocess.std"),
    ("--cl-calib", "cl_calib.enabled"),
    ("--cl-lambda", "cl_calib.lambda"),
    ("--cl-tau", "cl_calib.tau"),
    ("--cl-mapping", "cl_calib.mapping"),
    ("--cl-tail-end", "cl_calib.tail_end"),
    ("--cl-tail-units", "cl_calib.tail_units"),
    ("--cl-critic", "cl_calib.critic"),
    ("--cl-negatives", "cl_calib.negatives"),
    ("--cl-every", "cl_calib.every"),
    ("--cl-hold", "cl_calib.hold"),
    ("--cl-rec-weight", "cl_calib.rec_weight"),
    ("--weight-mb", "budget.weight_mb"),
    ("--w-bits-avg", "budget.w_bits_avg"),
    ("--a-bits-avg", "budget.a_bits_avg"),
    ("--w-choices", "budget.w_choices"),
    ("--a-choices", "budget.a_choices"),
    ("--max-top1-drop", "target.max_top1_drop"),
    ("--time-budget-s", "target.time_budget_s"),
)


def field(path: str) -> FieldInfo:
    """The pydantic field a dotted config path names."""
    model: type[BaseModel] = CalibConfig
    *outer, last = path.split(".")
    for part in outer:
        model = model.model_fields[part].annotation
        if typing.get_origin(model) in (typing.Union, types.UnionType):  # an optional section: Budget | None
            model = next(a for a in typing.get_args(model) if a is not type(None))
    for name, f in model.model_fields.items():
        if last in (name, f.alias):
            return f
    raise KeyError(path)


def _nullable(kind):
    def parse(text: str):
        return None if text.strip().lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.replace(",", " ").split()]


def _shown(v: Any) -> str:
    if isinstance(v, Enum):
        return str(v.value)
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return ",".join(_shown(x) for x in v) or "nothing"
    return str(v)


def _range(f: FieldInfo) -> str:
    lo = hi = None
    for m in f.metadata:
        lo = next((getattr(m, a) for a in ("ge", "gt") if getattr(m, a, None) is not None), lo)
        hi = next((getattr(m, a) for a in ("le", "lt") if getattr(m, a, None) is not None), hi)
    return f"{lo}..{hi}" if lo is not None and hi is not None else ""


def _nullable_field(f: FieldInfo) -> bool:
    return typing.get_origin(f.annotation) in (typing.Union, types.UnionType) and \
        type(None) in typing.get_args(f.annotation)


def _kwargs(f: FieldInfo) -> dict[str, Any]:
    """argparse keyword arguments for one field (type, choices, action)."""
    ann = f.annotation
    nullable = _nullable_field(f)
    base = next(a for a in typing.get_args(ann) if a is not type(None)) if nullable else ann
    if base is bool:  # --x sets true, --no-x false (a default may be true: cl_calib.hold)
        return {"action": argparse.BooleanOptionalAction}
    if isinstance(base, type) and issubclass(base, Enum):
        return {"choices": [m.value for m in base]}
    if typing.get_origin(base) is Literal:  # a field's BeforeValidator maps old names before the choices apply
        before = next((m.func for m in f.metadata if isinstance(m, BeforeValidator)), None)
        return {"choices": list(typing.get_args(base)), **({"type": before} if before else {})}
    if typing.get_origin(base) is tuple:
        inner = typing.get_args(base)[0]
        if isinstance(inner, type) and issubclass(inner, Enum):  # a list: the flag is given once per item
            return {"action": "append", "choices": [m.value for m in inner]}
        return {"type": _floats, "metavar": "V[,V,V]"}
    kind = base if base in (int, float, str) else str
    return {"type": _nullable(kind) if nullable else kind}


def add_config_flags(parser: argparse.ArgumentParser, only: set[str] | None = None) -> None:
    """The config flags (``only`` those named), grouped; none of them sets anything unless given
    (the default shown is the config's, which a --config file may change)."""
    groups = {
        "": parser.add_argument_group("calibration (each flag overrides --config; defaults are the config's)"),
        "preprocess": parser.add_argument_group("preprocessing: how images become tensors "
                                                "(for 28x28 inputs give --resize none --crop none)"),
        "cl_calib": parser.add_argument_group("CL-Calib: the contrastive term (docs/cl_calib.md)"),
        "budget": parser.add_argument_group("mixed precision under a size budget (docs/mixed_precision.md)"),
        "target": parser.add_argument_group("accuracy target: the smallest model within a top-1 drop "
                                            "(needs --evaluation; docs/mixed_precision.md)"),
    }
    for flag, path in FLAGS:
        if only is not None and flag not in only:
            continue
        f = field(path)
        kw = _kwargs(f)
        bits = [f.description or ""]
        if (r := _range(f)) and "choices" not in kw:
            bits.append(f"range {r}")
        if _nullable_field(f):
            bits.append("'none' for null")
        if f.is_required():
            bits.append("required in this section")
        elif kw.get("action") is not argparse.BooleanOptionalAction:
            bits.append(f"default: {_shown(f.default)}")
        group = groups[path.split(".")[0] if "." in path else ""]
        group.add_argument(flag, dest=_dest(flag), default=argparse.SUPPRESS,
                           help="; ".join(b for b in bits if b), **kw)


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def config_overrides(args: argparse.Namespace, base: dict | None = None) -> dict:
    """``base`` (a --config JSON object) with every given flag set at its path."""
    out = dict(base or {})
    for flag, path in FLAGS:
        if not hasattr(args, _dest(flag)):
            continue
        value = getattr(args, _dest(flag))
        *outer, last = path.split(".")
        node = out
        for part in outer:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[last] = value
    return out
