"""The frozen FP remainder of a network after one reconstruction unit.

``fp_tail(qmodel, k, end)`` maps unit k's output tensor to the logits (``end="logits"``) or to
the penultimate features, the input of the final Linear (``end="features"``).
``fp_tail_units(qmodel, k, n)`` maps it through the next n units only (to the logits when fewer
remain). ``fp_head(qmodel)`` maps the features to the logits, so that
``fp_head(qm)(fp_tail(qm, k, "features")(z)) == fp_tail(qm, k, "logits")(z)`` and a caller that
needs both runs the tail once.

How: ``qmodel.model`` is traced once with torch.fx, every ``QuantUnit`` a leaf (cached per
QuantModel); the tail of unit k is the part of that graph that computes the output from unit
k's call, with that call's value as its one input. A tail that needs any other earlier value (a
skip connection around unit k that no registered block contains, or the network input) is not
a function of the unit's output alone: UnsupportedModel, saying which settings avoid the tail.
Wrong arguments (an unknown ``end``, a unit index out of range) are the caller's bug:
ValueError / IndexError.

The tail shares its modules with ``qmodel`` (no copies; later changes of the model are seen),
runs them with quantization switched off whatever the global state (``quant.switch``), with
their parameters frozen and their activations out of place for the duration of its forward
pass: gradients flow to its input, never to a later unit's step sizes. Use it under ``torch.no_grad()`` for the FP side.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Literal

import torch
import torch.fx as fx
from torch import Tensor, nn

from clcalib.errors import UnsupportedModel
from clcalib.graph.partition import QuantModel
from clcalib.quant.layer import QuantUnit
from clcalib.quant.switch import frozen, quantization

__all__ = ["TailEnd", "FpTail", "fp_tail", "fp_tail_units", "fp_head", "apply_chunked"]

TailEnd = Literal["logits", "features"]
_ENDS = ("logits", "features")
# what a user can change when the model has no such tail
_AVOID = ("pdquant and cl_calib's 'fp_tail' mapping need it; use partition 'graph' (its units contain such "
          "connections), method qdrop, or cl_calib.mapping 'pool' or 'flatten'")


class _UnitLeafTracer(fx.Tracer):
    """torch.fx's default leaves (torch.nn modules) plus every reconstruction unit."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, QuantUnit) or super().is_leaf_module(m, module_qualified_name)


class _Trace:
    def __init__(self, qmodel: QuantModel):
        try:
            self.graph = _UnitLeafTracer().trace(qmodel.model)
        except Exception as e:  # fx cannot trace data-dependent control flow
            raise UnsupportedModel(
                f"cannot trace {type(qmodel.model).__name__} with torch.fx to find the FP remainder "
                f"after a unit ({type(e).__name__}: {e}); {_AVOID}"
            ) from e
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        calls = {n.target: n for n in self.graph.nodes if n.op == "call_module"}
        missing = [name for name in qmodel.unit_names if name not in calls]
        if missing:
            raise UnsupportedModel(f"units {missing} do not appear as calls in the traced graph; {_AVOID}")
        self.unit_nodes = [calls[name] for name in qmodel.unit_names]
        out = next(n for n in self.graph.nodes if n.op == "output")
        self.logits = out.args[0]
        if not isinstance(self.logits, fx.Node):
            raise UnsupportedModel(
                f"the model must return one logits tensor, its traced output is {out.args[0]!r}; {_AVOID}"
            )
        last = self.unit_nodes[-1]
        if not last.args or not isinstance(last.args[0], fx.Node):
            raise UnsupportedModel(f"the final unit {last.target} does not take one tensor input; {_AVOID}")
        self.features = last.args[0]
        self.cache: dict[tuple, FpTail] = {}


_TRACES: weakref.WeakKeyDictionary[QuantModel, _Trace] = weakref.WeakKeyDictionary()


def _trace(qmodel: QuantModel) -> _Trace:
    tr = _TRACES.get(qmodel)
    if tr is None:
        tr = _TRACES[qmodel] = _Trace(qmodel)
    return tr


@contextmanager
def _out_of_place(modules: list[nn.Module]):
    """Activations with ``inplace=True`` (torchvision's ReLUs) computed out of place, then restored.

    With quantization off, a QuantLayer hands its activation's output on as is, and a block's
    in-place ReLU after it overwrites a tensor that autograd saved; with it on, the quantizer
    makes a fresh tensor. The tail needs a backward pass in FP, and must not overwrite its input."""
    mods = [m for m in modules if isinstance(getattr(m, "inplace", None), bool)]
    saved = [m.inplace for m in mods]
    for m in mods:
        m.inplace = False
    try:
        yield
    finally:
        for m, s in zip(mods, saved, strict=True):
            m.inplace = s


class FpTail(nn.Module):
    """A segment of the traced model, run in FP with frozen parameters (see the module doc)."""

    def __init__(self, gm: fx.GraphModule, description: str):
        super().__init__()
        self.gm = gm
        self.description = description
        # walked once: the tail runs every iteration, and walking a deep model's modules three
        # times per call cost ~1.5 ms of a 19 ms mobilenet_v2 tail (the structure is fixed after
        # conversion)
        self._modules_once = list(gm.modules())

    def forward(self, z: Tensor) -> Tensor:
        mods = self._modules_once
        with quantization(self.gm, False, mods), frozen(self.gm, mods), _out_of_place(mods):
            return self.gm(z)

    def extra_repr(self) -> str:
        return self.description


def _segment(qmodel: QuantModel, tr: _Trace, start: fx.Node, stop: fx.Node, what: str) -> FpTail:
    """The nodes that compute ``stop`` from ``start``'s value, as a module of one input."""
    needed: set[fx.Node] = set()
    stack = [stop]
    while stack:
        n = stack.pop()
        if n in needed or n is start:
            continue
        if tr.order[n] < tr.order[start] and n.op != "get_attr":
            src = "the network input" if n.op == "placeholder" else f"{n.op} {n.target}"
            raise UnsupportedModel(
                f"{what}: the rest of the network also uses {src}, computed before the unit, so it "
                f"is not a function of the unit's output alone; {_AVOID}"
            )
        needed.add(n)
        stack.extend(n.all_input_nodes)
    if stop is not start and not any(start in n.all_input_nodes for n in needed):
        raise UnsupportedModel(f"{what}: the output does not depend on the unit's output; {_AVOID}")
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: g.placeholder("z")}
    for n in sorted(needed, key=tr.order.__getitem__):
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[stop])
    g.lint()
    gm = fx.GraphModule(qmodel.model, g, class_name="FpTailGraph")
    return FpTail(gm, what)


def _unit_index(qmodel: QuantModel, unit_index: int) -> tuple[int, int]:
    """(the unit's index from 0, the number of units); negative indices count from the end."""
    n_units = len(qmodel.unit_names)
    if not -n_units <= unit_index < n_units:
        raise IndexError(f"unit_index must be in [0, {n_units}), got {unit_index}")
    return unit_index % n_units, n_units


def fp_tail(qmodel: QuantModel, unit_index: int, end: TailEnd = "logits") -> FpTail:
    """The frozen FP network after unit ``unit_index`` (an index into ``qmodel.unit_names``):
    unit output -> logits, or -> penultimate features (the input of the final Linear).

    For the final unit (the classifier) the logits tail is the identity; it has no features
    tail (ValueError). Built once per (QuantModel, unit, end) and cached."""
    if end not in _ENDS:
        raise ValueError(f"end must be one of {_ENDS}, got {end!r}")
    k, n_units = _unit_index(qmodel, unit_index)
    tr = _trace(qmodel)
    key = ("tail", k, end)
    if key not in tr.cache:
        start = tr.unit_nodes[k]
        if end == "features":
            if k == n_units - 1:
                raise ValueError(
                    f"unit {k} ({qmodel.unit_names[k]}) is the final Linear: no features come after "
                    "it; use end='logits' (the identity) for it"
                )
            stop = tr.features
        else:
            stop = tr.logits
        what = f"FP tail {qmodel.unit_names[k]} -> {end}"
        tr.cache[key] = _segment(qmodel, tr, start, stop, what)
    return tr.cache[key]


def fp_tail_units(qmodel: QuantModel, unit_index: int, units: int) -> FpTail:
    """The frozen FP network from unit ``unit_index``'s output through the next ``units`` units:
    their output, as the FP model computes it there; the logits tail where no more than ``units``
    units (the classifier among them) follow. Built once per (QuantModel, unit, units), cached."""
    if units < 1:
        raise ValueError(f"units must be >= 1, got {units}")
    k, n_units = _unit_index(qmodel, unit_index)
    if k + units >= n_units - 1:
        return fp_tail(qmodel, k, "logits")
    tr = _trace(qmodel)
    key = ("units", k, units)
    if key not in tr.cache:
        what = f"FP tail {qmodel.unit_names[k]} -> {qmodel.unit_names[k + units]}"
        tr.cache[key] = _segment(qmodel, tr, tr.unit_nodes[k], tr.unit_nodes[k + units], what)
    return tr.cache[key]


def fp_head(qmodel: QuantModel) -> FpTail:
    """The frozen FP map from the penultimate features to the logits (the final Linear and
    whatever follows it)."""
    tr = _trace(qmodel)
    key = ("head",)
    if key not in tr.cache:
        tr.cache[key] = _segment(qmodel, tr, tr.features, tr.logits, "FP head features -> logits")
    return tr.cache[key]


@torch.no_grad()
def apply_chunked(module: nn.Module, z: Tensor, batch_size: int = 256, device: torch.device | None = None) -> Tensor:
    """``module`` over ``z`` in chunks, no gradient (the FP side over a whole calibration set).
    Each chunk runs on ``device`` (default: ``z``'s): ``z`` may be held in host memory."""
    device = device if device is not None else z.device
    return torch.cat([module(c.to(device)) for c in z.split(batch_size)])
