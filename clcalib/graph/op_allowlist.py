"""What an uploaded program may compute: the op allowlist, and the check of a serialized graph
against it (run on the program's JSON, before torch builds anything from it).

An uploaded ``.pt2`` is data, not code, only if every node of its graph is a side-effect-free
compute op: no file I/O (``aten.from_file``, ``aten.save``), no op that aliases storage from
outside the graph, no custom or higher-order op whose body we cannot see. So the rule is an
allowlist, not a denylist:

- ``ATEN``: the ATen ops (by overload packet; every overload of a listed op is allowed) that the
  vision models we take need: torchvision's classifiers (ResNet, MobileNet v2/v3, EfficientNet,
  RegNet, MnasNet, ConvNeXt, ViT, Swin, DenseNet, SqueezeNet, ShuffleNet, GoogLeNet) as
  ``torch.export`` captures them, and the functional core ATen ops they decompose into.
- An in-place variant (``relu_``, ``add_``, ``fill_``...) of a listed op, and any op with an
  ``out=`` argument, may only write to a tensor computed inside the graph: never to an input,
  a parameter, a buffer or a constant, nor to a view of one.
- ``PYTHON``: the few Python-level targets ``torch.export`` emits (``operator.getitem`` for
  multi-output ops, integer arithmetic on symbolic sizes).

Extending it: add the op's packet name to ``ATEN`` (check its schema first with
``torch.ops.aten.<name>.default._schema``: it must only read its inputs and return new tensors
or views of them), export a model that uses it, and run ``tests/test_op_allowlist.py``, which
also asserts that no op taking a file name or path is ever allowed.

Symbolic sizes arrive as expression strings that torch hands to ``sympy.sympify`` (which
evaluates Python); each must be a plain arithmetic expression of size symbols and integers
(``SYM_EXPR``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

ATEN = frozenset("""
    conv1d conv2d conv3d convolution _convolution conv_transpose1d conv_transpose2d
    linear addmm mm bmm matmul baddbmm t einsum
    batch_norm _native_batch_norm_legit_no_training native_batch_norm _native_batch_norm_legit_functional
    layer_norm native_layer_norm group_norm native_group_norm instance_norm rms_norm
    relu relu6 hardtanh hardswish hardsigmoid silu sigmoid tanh gelu leaky_relu elu selu celu mish softplus
    threshold prelu _prelu_kernel glu clamp clamp_min clamp_max clip
    softmax _softmax log_softmax _log_softmax _safe_softmax
    erf exp log sqrt rsqrt reciprocal pow abs neg sign maximum minimum where
    max_pool2d max_pool2d_with_indices avg_pool2d adaptive_avg_pool2d _adaptive_avg_pool2d adaptive_max_pool2d
    avg_pool1d max_pool1d adaptive_avg_pool1d
    add sub rsub mul div true_divide floor_divide mean sum amax amin max min var var_mean std prod
    view _unsafe_view reshape flatten unflatten permute transpose contiguous clone expand expand_as
    squeeze unsqueeze slice select split split_with_sizes chunk unbind narrow cat stack index index_select
    gather roll pad constant_pad_nd reflection_pad2d replication_pad2d flip repeat tile alias detach
    lift_fresh_copy _to_copy to type_as masked_fill eq ne lt gt le ge logical_not logical_and logical_or
    arange zeros ones full new_zeros new_ones new_full zeros_like ones_like full_like scalar_tensor fill
    sym_size sym_numel sym_stride dropout native_dropout feature_dropout alpha_dropout
    upsample_nearest2d upsample_bilinear2d pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle
    scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu
    _scaled_dot_product_efficient_attention _scaled_dot_product_flash_attention
    _assert_tensor_metadata _assert_scalar sym_constrain_range_for_size copy slice_scatter select_scatter
""".split())

# in-place variants allowed on graph-internal tensors only (see module docstring)
INPLACE = frozenset(f"{op}_" for op in ATEN)

PYTHON = frozenset(f"_operator.{f}" for f in
                   "getitem add sub mul floordiv truediv mod neg eq ne lt le gt ge".split())

# sympy text of a size expression, as torch writes it (sympy's srepr: "Mul(Integer(4),
# Symbol('s77', positive=True, integer=True))") or plainly ("4*s77"): size symbols, integers,
# arithmetic and the integer functions torch uses; no other names, no attributes, no other
# strings, no powers (a tiny "Pow(9, 10**9)" would take sympy hours)
_SYMBOL = r"[supqzd]\d{1,6}"
_ASSUME = r"(?:positive|integer|nonnegative|negative|nonpositive|real|finite|zero)=(?:True|False)"
_FUNCS = ("Integer|Rational|Add|Mul|Max|Min|Mod|PythonMod|FloorDiv|CeilDiv|CeilToInt|FloorToInt|TruncToInt|"
          "IntTrueDiv|CleanDiv|ToFloat|Abs|Eq|Ne|Lt|Le|Gt|Ge|StrictLessThan|LessThan|StrictGreaterThan|"
          "GreaterThan|Equality|Unequality|And|Or|Not|BooleanTrue|BooleanFalse|true|false|True|False|oo|"
          "Infinity|NegativeInfinity")
SYM_EXPR = re.compile(rf"(?:Symbol\('{_SYMBOL}'(?:, {_ASSUME})*\)|\b{_SYMBOL}\b|\b(?:{_FUNCS})\b|\d{{1,12}}"
                      r"|[-+*/%(),<>=!&| ])*")
MAX_EXPR_CHARS = 500


def packet(target: str) -> tuple[str, str] | None:
    """("aten", "relu_") for "torch.ops.aten.relu_.default"; None for anything else."""
    parts = target.split(".")
    if len(parts) == 5 and parts[:2] == ["torch", "ops"]:
        return parts[2], parts[3]
    return None


def target_allowed(target: str) -> bool:
    """Whether a serialized node target is an op an uploaded graph may call (in-place ones still
    need ``check_program``'s check of what they write)."""
    if target in PYTHON:
        return True
    p = packet(target)
    return p is not None and p[0] == "aten" and (p[1] in ATEN or p[1] in INPLACE)


def _schema(target: str):
    import torch

    ns, name = packet(target)  # type: ignore[misc]
    overload = target.rsplit(".", 1)[1]
    return getattr(getattr(getattr(torch.ops, ns), name), overload)._schema


def _tensor_names(arg) -> Iterator[str]:
    """Names of the tensors an argument of a serialized node refers to."""
    if not isinstance(arg, dict) or len(arg) != 1:
        return
    (kind, val), = arg.items()
    if kind == "as_tensor" and isinstance(val, dict):
        yield str(val.get("name"))
    elif kind in ("as_tensors", "as_optional_tensors") and isinstance(val, list):
        for v in val:
            if isinstance(v, dict) and "name" in v:
                yield str(v["name"])
            else:
                yield from _tensor_names(v)


def _outputs(node: dict) -> Iterator[str]:
    for out in node.get("outputs") or []:
        yield from _tensor_names(out)


REFUSED_ARGS = {"as_graph": "a nested graph (a higher-order op such as cond or map)",
                "as_custom_obj": "a custom object", "as_operator": "an operator passed as a value"}


def check_program(program: dict) -> list[str]:
    """Problems with a serialized ExportedProgram (the JSON of ``models/<name>.json``), each one
    line naming what is not allowed; empty when the graph only computes."""
    problems: list[str] = []
    if program.get("guards_code"):
        problems.append(f"it carries {len(program['guards_code'])} line(s) of Python guard code, which "
                        "torch would compile and run")
    gm = program.get("graph_module")
    graph = gm.get("graph") if isinstance(gm, dict) else None
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        return [*problems, "no graph in the program"]
    if graph.get("custom_obj_values"):
        problems.append("its graph holds custom objects")
    kinds = {next(iter(s)) for s in (gm.get("signature") or {}).get("input_specs", []) if isinstance(s, dict) and s}
    odd = kinds - {"user_input", "parameter", "buffer", "tensor_constant", "constant_input"}
    if odd:
        problems.append(f"its inputs include {', '.join(sorted(odd))}")

    view_of: dict[str, str] = {}  # a view's name -> the tensor whose storage it shares
    made_here: set[str] = set()  # tensors with storage of their own, created by a graph node

    def root(name: str) -> str:
        seen = 0
        while name in view_of and seen < 10_000:
            name, seen = view_of[name], seen + 1
        return name

    for node in graph["nodes"]:
        if not isinstance(node, dict):
            return [*problems, "a graph node that is not an object"]
        target = str(node.get("target", ""))[:200]
        args = [i.get("arg") for i in node.get("inputs") or [] if isinstance(i, dict)]
        for a in args:
            if isinstance(a, dict) and a.keys() & REFUSED_ARGS.keys():
                problems.append(f"{target} takes {REFUSED_ARGS[next(iter(a.keys() & REFUSED_ARGS.keys()))]}")
        if not target_allowed(target):
            problems.append(f"op {target} is not on the allowlist of side-effect-free compute ops")
            continue
        outs = list(_outputs(node))
        if target in PYTHON:
            src = [n for a in args for n in _tensor_names(a)]
            for name in outs:  # an element of a list of tensors: it shares that tensor's storage
                view_of[name] = src[0] if src else name
            continue
        try:
            schema = _schema(target)
        except (AttributeError, RuntimeError):
            problems.append(f"op {target} does not exist in this torch")
            continue
        written = []
        for i, a in enumerate(schema.arguments):
            info = a.alias_info
            if info is not None and info.is_write:
                inp = next((x.get("arg") for x in node.get("inputs") or []
                            if isinstance(x, dict) and x.get("name") == a.name), None)
                if inp is None and i < len(args):
                    inp = args[i]
                written.extend(_tensor_names(inp))
        outside = [n for n in written if root(n) not in made_here]
        if outside:
            problems.append(f"{target} writes in place to {outside[0]!r}, an input, weight or constant of "
                            "the program (or a view of one)")
        tensor_args = [n for a in args for n in _tensor_names(a)]
        aliases = [r.alias_info for r in schema.returns if r.alias_info is not None]
        for name in outs:  # a view (or the tensor an in-place op wrote) shares its input's storage
            if aliases:
                view_of[name] = written[0] if any(a.is_write for a in aliases) and written else \
                    (tensor_args[0] if tensor_args else name)
            else:
                made_here.add(name)

    for expr in _expr_strings(program):
        if len(expr) > MAX_EXPR_CHARS or "**" in expr or not SYM_EXPR.fullmatch(expr):
            problems.append(f"a symbolic size {expr[:60]!r} that is not plain arithmetic of size symbols")
            break
    return problems


def _expr_strings(obj, depth: int = 0) -> Iterator[str]:
    """Every ``expr_str`` in the program, wherever it sits (torch parses each with sympy)."""
    if depth > 64:
        yield "<nested too deeply>"
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "expr_str":
                yield v if isinstance(v, str) else repr(v)
            else:
                yield from _expr_strings(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            yield from _expr_strings(v, depth + 1)
