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
(``plain_size_expression``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

ATEN = frozenset("""
    conv1d conv2d conv3d convolution conv_transpose1d conv_transpose2d
    linear addmm mm bmm matmul baddbmm t einsum
    batch_norm layer_norm group_norm instance_norm
    relu relu6 hardtanh hardswish hardsigmoid silu sigmoid tanh gelu leaky_relu elu selu celu mish softplus
    threshold prelu glu clamp clamp_min clamp_max clip
    softmax log_softmax
    erf exp log sqrt rsqrt reciprocal pow abs neg sign maximum minimum where
    addcmul linalg_vector_norm sin cos cumsum bitwise_not
    max_pool2d avg_pool2d adaptive_avg_pool2d adaptive_max_pool2d avg_pool1d max_pool1d adaptive_avg_pool1d
    add sub rsub mul div true_divide floor_divide mean sum amax amin max min var var_mean std prod
    view reshape reshape_as flatten unflatten permute transpose contiguous clone expand expand_as
    squeeze unsqueeze slice select split split_with_sizes chunk unbind narrow cat stack index index_select
    gather roll pad constant_pad_nd reflection_pad2d replication_pad2d flip repeat tile alias detach
    lift_fresh_copy to type_as masked_fill eq ne lt gt le ge logical_not logical_and logical_or
    arange zeros ones full new_zeros new_ones new_full zeros_like ones_like full_like scalar_tensor fill
    sym_size sym_numel sym_stride dropout feature_dropout alpha_dropout
    upsample_nearest2d upsample_bilinear2d pixel_shuffle pixel_unshuffle channel_shuffle
    scaled_dot_product_attention
    _assert_tensor_metadata _assert_scalar sym_constrain_range_for_size copy slice_scatter select_scatter
""".split())

# the kernels the public ops above decompose into (``ExportedProgram.run_decompositions``): allowed
# in the graph a clcalib checkpoint stores (written by clcalib from a checked upload), never in an
# upload. Several do not check their arguments' shapes against each other (a batch norm's running
# statistics against the input's channels: a write past the end of a tensor), which the public
# op checks before calling them.
DECOMPOSED = frozenset("""
    _convolution _native_batch_norm_legit_no_training native_batch_norm _native_batch_norm_legit_functional
    native_layer_norm native_group_norm _prelu_kernel _softmax _log_softmax _safe_softmax
    max_pool2d_with_indices _adaptive_avg_pool2d _unsafe_view _to_copy native_dropout native_channel_shuffle
    _scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_efficient_attention
    _scaled_dot_product_flash_attention
""".split())

# ops whose result may share memory with an argument although their schema does not say so (a
# no-op dropout, type_as to the same dtype, a permutation einsum, contiguous on a contiguous
# tensor): an in-place write to the result could reach a weight
MAY_ALIAS = frozenset("""
    dropout feature_dropout alpha_dropout native_dropout type_as _unsafe_view einsum contiguous to reshape reshape_as
    flatten unflatten expand_as matmul alias detach _to_copy clone lift_fresh_copy
""".split()) - {"clone", "lift_fresh_copy", "_to_copy"}

# in-place variants allowed on graph-internal tensors only (see module docstring)
INPLACE = frozenset(f"{op}_" for op in ATEN)
TREESPEC_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"}

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
SYM_TOKEN = re.compile(rf"Symbol\('{_SYMBOL}'(?:, {_ASSUME})*\)|{_SYMBOL}\b|(?:{_FUNCS})\b|\d{{1,12}}\b"
                       r"|[-+*/%(),=!&| ]|<=?|>=?")
MAX_EXPR_CHARS = 500


def plain_size_expression(expr: str) -> bool:
    """Whether ``expr`` is a sequence of ``SYM_TOKEN`` tokens (matched left to right, one token at
    a time: linear in its length) with no power (``**``) or shift (``<<``, ``>>``)."""
    if len(expr) > MAX_EXPR_CHARS or "**" in expr or "<<" in expr or ">>" in expr:
        return False
    pos = 0
    while pos < len(expr):
        m = SYM_TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            return False
        pos = m.end()
    return True


def _check_call_graph(calls) -> list[str]:
    """The module call graph's input/output specs are pytree specs torch rebuilds by name
    (``treespec_loads`` imports the module a defaultdict or an enum names): only tuples, lists,
    dicts and leaves."""
    import json

    def walk(node, depth=0) -> bool:
        if depth > 64:
            return False
        if isinstance(node, list):
            return all(walk(n, depth + 1) for n in node)
        if isinstance(node, dict):
            if "__enum__" in node or node.get("type", None) not in TREESPEC_TYPES:
                return False
            ctx = node.get("context")
            if isinstance(ctx, str):
                try:
                    ctx = json.loads(ctx)
                except ValueError:
                    return False
            if ctx is not None and not (isinstance(ctx, list) and all(isinstance(c, (str, int)) for c in ctx)):
                return False
            return walk(node.get("children_spec") or [], depth + 1)
        return isinstance(node, (int, str)) or node is None

    for call in calls or []:
        sig = call.get("signature") if isinstance(call, dict) else None
        for key in ("in_spec", "out_spec"):
            spec = (sig or {}).get(key)
            if spec is None:
                continue
            try:
                ok = isinstance(spec, str) and walk(json.loads(spec))
            except (ValueError, RecursionError):
                ok = False
            if not ok:
                return [f"its call graph's {key} names types other than tuples, lists and dicts"]
    return []


def packet(target: str) -> tuple[str, str] | None:
    """("aten", "relu_") for "torch.ops.aten.relu_.default"; None for anything else."""
    parts = target.split(".")
    if len(parts) == 5 and parts[:2] == ["torch", "ops"]:
        return parts[2], parts[3]
    return None


def target_allowed(target: str, decomposed: bool = False) -> bool:
    """Whether a serialized node target is an op an uploaded graph (``decomposed``: a stored
    checkpoint's graph) may call; in-place ones still need ``check_program``'s check of what
    they write."""
    if target in PYTHON:
        return True
    p = packet(target)
    return p is not None and p[0] == "aten" and (p[1] in ATEN or p[1] in INPLACE or (decomposed and p[1] in DECOMPOSED))


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


def check_program(program: dict, decomposed: bool = False) -> list[str]:
    """Problems with a serialized ExportedProgram (the JSON of ``models/<name>.json``), each one
    line naming what is not allowed; empty when the graph only computes. ``decomposed``: the
    graph a clcalib checkpoint stores (see ``DECOMPOSED``)."""
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
    outs = {next(iter(o)) for o in (gm.get("signature") or {}).get("output_specs", []) if isinstance(o, dict) and o}
    if outs - {"user_output"}:  # e.g. user_input_mutation: calling it would overwrite the caller's tensor
        problems.append(f"its outputs include {', '.join(sorted(outs - {'user_output'}))}")
    problems += _check_call_graph(gm.get("module_call_graph"))
    for key in program.get("range_constraints") or {}:
        if not re.fullmatch(r"[a-z]{1,3}\d{1,6}", str(key)):
            problems.append(f"a size symbol named {str(key)[:40]!r}")
            break

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
        if not target_allowed(target, decomposed):
            hint = " (a kernel of run_decompositions: upload the program as torch.export.export returns it)" \
                if (packet(target) or ("", ""))[1] in DECOMPOSED else ""
            problems.append(f"op {target} is not on the allowlist of side-effect-free compute ops{hint}")
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
        may_alias = packet(target)[1] in MAY_ALIAS  # type: ignore[index]
        for name in outs:  # a view (or the tensor an in-place op wrote) shares its input's storage
            if aliases or may_alias:
                view_of[name] = written[0] if any(a.is_write for a in aliases) and written else \
                    (tensor_args[0] if tensor_args else name)
            else:
                made_here.add(name)

    for expr in _expr_strings(program):
        if not plain_size_expression(expr):
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


def _attention(args, kwargs) -> str | None:
    q, k, v = args[:3]
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    if not all(hasattr(t, "shape") for t in (q, k, v)) or not q.dim() == k.dim() == v.dim() >= 2:
        return "attention on inputs that are not tensors of the same rank"
    if k.shape[:-1] != v.shape[:-1] or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        return f"attention with query {tuple(q.shape)}, key {tuple(k.shape)} and value {tuple(v.shape)} that do not match"
    if mask is not None and hasattr(mask, "shape") and mask.dim() >= 2 and (
            mask.shape[-1] not in (1, k.shape[-2]) or mask.shape[-2] not in (1, q.shape[-2])):
        return f"an attention mask {tuple(mask.shape)} for {q.shape[-2]} queries and {k.shape[-2]} keys"
    return None


# ops whose kernels read their arguments' memory by sizes they do not check against each other:
# each call is checked with the real tensors before it runs (``CheckedInterpreter``)
CALL_CHECKS = {name: _attention for name in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                                             "_scaled_dot_product_efficient_attention",
                                             "_scaled_dot_product_flash_attention")}


class UnsafeCall(ValueError):
    """A call whose arguments' shapes would make its kernel read or write out of bounds."""


def checked_interpreter():
    """An ``fx.Interpreter`` class that checks each call in ``CALL_CHECKS`` before it runs."""
    from torch import fx

    class CheckedInterpreter(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            name = getattr(getattr(target, "_overloadpacket", None), "__name__", "")
            check = CALL_CHECKS.get(name)
            if check is not None:
                why = check(args, kwargs)
                if why:
                    raise UnsafeCall(f"{target}: {why}; its kernel would read outside the tensors")
            return super().call_function(target, args, kwargs)

    return CheckedInterpreter
