"""Any model, from its captured graph: layers fused, units found, quantizers placed.

1. The torch.export program (functional ATen ops) has every ``conv2d`` / ``linear`` whose weight
   is a parameter, with the BatchNorm and the ReLU/ReLU6 right after it (sole users), replaced
   by one QuantLayer. Other ops stay as they are, in float.
2. Cuts: a point in the graph's order where exactly one value that depends on the input is
   alive. Between two cuts lies a *segment*; one with two or more input-dependent ops is a
   branch-and-merge region (a residual block, a squeeze-excitation, attention + its skip).
3. Block classes: the module class that most deeply contains a region (BasicBlock,
   InvertedResidual, EncoderBlock, MBConv, ...). Every instance of such a class becomes one
   unit, whether or not that instance has its skip (as the registry treats MobileNetV2). A
   region outside any module becomes a unit of its own; every other segment with a layer is a
   single-layer unit; segments without a layer stay between units, in float.
4. Quantizers, as docs/algorithm.md: a single-layer unit quantizes its output (unless only an
   unfused activation reads it: the next layer's input quantizer does that after the
   activation); inside a block a layer quantizes its output before a fused ReLU/ReLU6 (every
   one with ``every_layer``); a block quantizes its output unless it feeds a LayerNorm (a
   transformer's residual stream stays float). Every Conv/Linear whose input is not already on a
   quantizer's grid gets an input quantizer, except the first layer (the image) and the
   classifier.

The result is an ``fx.GraphModule`` whose units are ``QuantUnit`` submodules named for the
module they came from (``layer1.0``, ``features.3``, ``encoder.layers.encoder_layer_0``);
within them, layers keep their relative names, so the seven registry architectures get the same
unit and layer names as the module path (docs/architecture.md).
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field, replace

import torch
from torch import fx, nn

from clcalib.errors import UnsupportedModel
from clcalib.graph.attrs import fetch_attr
from clcalib.quant.activation import ActQuantizer
from clcalib.quant.layer import QuantLayer, QuantUnit

aten = torch.ops.aten
_LAYER_OPS = {aten.conv2d.default: "conv", aten.linear.default: "linear"}
_BN_OPS = {aten._native_batch_norm_legit_no_training.default}
# activations ONNX QDQ and the registry fuse into the layer (a ReLU6 is hardtanh(0, 6))
_RELU = {aten.relu.default}
_HARDTANH = {aten.hardtanh.default}
# elementwise activations left in float after a layer: the next layer quantizes their output
_UNFUSED_ACTS = {aten.silu.default, aten.gelu.default, aten.hardswish.default, aten.sigmoid.default,
                 aten.tanh.default, aten.hardsigmoid.default, aten.leaky_relu.default, aten.elu.default,
                 aten.mish.default}
_NORMS = {aten.layer_norm.default, aten.group_norm.default, aten.native_layer_norm.default}
# ops that keep each value unchanged (only moved): a quantizer's grid survives them
ON_GRID_OPS = {aten.view.default, aten.reshape.default, aten.permute.default, aten.transpose.int,
               aten.flatten.using_ints, aten.clone.default, aten.contiguous.default, aten.max_pool2d.default,
               aten.squeeze.dim, aten.unsqueeze.default, aten.alias.default, aten.t.default}


@dataclass
class _Layer:
    node: fx.Node  # the call_module node that replaced the chain
    module: QuantLayer
    path: str  # the weight's module path: layer1.0.conv1, encoder...self_attention.in_proj
    fused_act: bool


@dataclass
class _Unit:
    name: str
    nodes: list[fx.Node]
    inp: fx.Node
    out: fx.Node
    block: bool
    kind: str = "UnitBody"  # the block's module class (EncoderBlock, MBConv, ...), for inspect
    layers: list[_Layer] = field(default_factory=list)


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj = fetch_attr(gm, node.target)
        return obj.detach() if isinstance(obj, torch.Tensor) else None
    return None


def _stack(node: fx.Node) -> list[tuple[str, str]]:
    """The (module path, class name) chain that called ``node``, outermost first."""
    st = node.meta.get("nn_module_stack") or {}
    out = []
    for v in st.values():
        path, cls = v if isinstance(v, tuple) else (v, "")
        out.append((str(path), cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))))
    return out


def _weight_path(target: str) -> str:
    for suffix in (".weight", "_weight"):
        if target.endswith(suffix):
            return target[: -len(suffix)]
    return target


def _fuse_layers(gm: fx.GraphModule, spec) -> list[_Layer]:
    """Replace conv2d/linear (+BatchNorm)(+ReLU/ReLU6) chains by QuantLayer call_module nodes."""
    graph, layers = gm.graph, []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _LAYER_OPS:
            continue
        args = list(node.args) + [None] * 7
        w, b = _attr(gm, args[1]), _attr(gm, args[2])
        if w is None or (args[2] is not None and b is None):
            continue  # a product of two activations (attention's own matmuls): stays float
        if _LAYER_OPS[node.target] == "conv":
            stride, padding, dilation, groups = (args[3] or [1]), (args[4] or [0]), (args[5] or [1]), (args[6] or 1)
            if isinstance(padding, str):
                raise UnsupportedModel(f"{_weight_path(args[1].target)}: padding={padding!r}; export with explicit padding")
            pair = nn.modules.utils._pair  # aten gives [1] for (1, 1)
            base = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=pair(tuple(stride) if len(stride) > 1 else stride[0]),
                             padding=pair(tuple(padding) if len(padding) > 1 else padding[0]),
                             dilation=pair(tuple(dilation) if len(dilation) > 1 else dilation[0]), groups=groups,
                             bias=b is not None)
        else:
            base = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            base.weight.copy_(w)
            if b is not None:
                base.bias.copy_(b)
        cur, bn, act, chain = node, None, None, [node]
        users = list(cur.users)
        if (base.__class__ is nn.Conv2d and len(users) == 1 and users[0].target in _BN_OPS
                and users[0].args[0] is cur):
            bn_node = users[0]
            getters = list(bn_node.users)
            if len(getters) == 1 and getters[0].target is operator.getitem and getters[0].args[1] == 0:
                bw, bb, mean, var = (_attr(gm, a) for a in bn_node.args[1:5])
                if mean is not None and var is not None:
                    bn = nn.BatchNorm2d(w.shape[0], eps=float(bn_node.args[6]), affine=bw is not None)
                    with torch.no_grad():
                        bn.running_mean.copy_(mean)
                        bn.running_var.copy_(var)
                        if bw is not None:
                            bn.weight.copy_(bw)
                            bn.bias.copy_(bb if bb is not None else torch.zeros_like(bw))
                    cur = getters[0]
                    chain += [bn_node, cur]
        users = list(cur.users)
        if len(users) == 1 and users[0].args[0] is cur:
            u = users[0]
            if u.target in _RELU:
                act = nn.ReLU()
            elif u.target in _HARDTANH and tuple(u.args[1:3]) == (0.0, 6.0):
                act = nn.ReLU6()
            if act is not None:
                cur = u
                chain.append(u)
        ql = QuantLayer(base, bn, act, spec.w_bits, None, spec.w_symmetric, spec.act_search)
        target = f"_clcalib_layer_{len(layers)}"
        gm.add_submodule(target, ql)
        with graph.inserting_after(cur):
            new = graph.call_module(target, (node.args[0],))
        new.meta = dict(node.meta)
        cur.replace_all_uses_with(new)
        for n in reversed(chain):
            graph.erase_node(n)
        layers.append(_Layer(new, ql, _weight_path(args[1].target), act is not None))
    graph.eliminate_dead_code()
    return layers


def _holds_tensor(val) -> bool:
    """A tensor, or a tuple/list with one (``unbind``, ``split``, ``chunk``, ``native_layer_norm``)."""
    if isinstance(val, torch.Tensor):
        return True
    return isinstance(val, (tuple, list)) and any(_holds_tensor(v) for v in val)


def _is_shape(n: fx.Node) -> bool:
    """A symbolic size (the batch), or arithmetic on sizes: not a tensor that flows. An op that
    returns several tensors (timm's attention: ``qkv.unbind(0)``) flows like one tensor."""
    return n.op == "call_function" and not _holds_tensor(n.meta.get("val"))


def _rebase_sizes(graph: fx.Graph) -> None:
    """Read each size an op takes from the model's input (the batch) from that op's own tensor
    input instead, so no later part of the graph needs the input itself: a unit, or the FP tail
    after a unit (CL-Calib, PD-Quant), is then a function of the one value it receives."""
    ph = next(n for n in graph.nodes if n.op == "placeholder")

    def from_input(a) -> bool:
        return isinstance(a, fx.Node) and _is_shape(a) and (
            (a.target is aten.sym_size.int and a.args[0] is ph) or any(from_input(b) for b in a.all_input_nodes))

    def before(user: fx.Node):
        c = user.prev
        while c.op != "root":
            yield c
            c = c.prev

    def carrier(sym: str, t: fx.Node, user: fx.Node) -> tuple[fx.Node, int] | None:
        """``t`` if a dimension of it is ``sym``, else the nearest value before ``user`` that has one
        (the class token's expand reads the batch from the patch embeddings computed just before)."""
        for c in itertools.chain([t] if t is not user else [], before(user)):
            val = c.meta.get("val")
            if c.op in ("placeholder", "get_attr") or not isinstance(val, torch.Tensor):
                continue
            dims = [d for d, size in enumerate(val.shape) if str(size) == sym]
            if dims:
                return c, dims[0]
        return None

    def rebase(a: fx.Node, t: fx.Node, user: fx.Node) -> fx.Node:
        if a.target is aten.sym_size.int and a.args[0] is ph:
            found = carrier(str(a.meta.get("val")), t, user)
            if found is None:
                return a
            src, dim = found
            with graph.inserting_before(user):
                new = graph.call_function(aten.sym_size.int, (src, dim))
            new.meta = dict(a.meta)
            return new
        with graph.inserting_before(user):
            new = graph.node_copy(a, lambda b: rebase(b, t, user) if from_input(b) else b)
        return new

    for n in list(graph.nodes):
        if n.op != "call_function" or _is_shape(n) or not any(from_input(a) for a in n.all_input_nodes):
            continue
        tensors = [a for a in n.all_input_nodes if a is not ph and isinstance(a.meta.get("val"), torch.Tensor)]
        def swap(a, t=tensors[0] if tensors else n, user=n):
            return rebase(a, t, user) if from_input(a) else a

        n.args = fx.node.map_arg(n.args, swap)
        n.kwargs = fx.node.map_arg(n.kwargs, swap)
    graph.eliminate_dead_code()


def _order(graph: fx.Graph) -> tuple[list[fx.Node], set[fx.Node]]:
    """Nodes that depend on the input, in graph order, each preceded by the constant and size
    nodes it needs; and the set of those (constants: no input dependence; sizes: see _is_shape),
    which are copied to wherever they are used rather than passed between units."""
    dep: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder" or (any(a in dep for a in n.all_input_nodes) and not _is_shape(n)):
            dep.add(n)
    order, placed = [], set()

    def place(n: fx.Node) -> None:
        if n in placed:
            return
        for a in n.all_input_nodes:
            place(a)
        placed.add(n)
        if n.op != "get_attr":
            order.append(n)

    for n in graph.nodes:
        if n in dep:
            place(n)
    return order, {n for n in placed if n not in dep}


def _segments(order: list[fx.Node], const: set[fx.Node]) -> list[tuple[list[fx.Node], fx.Node, fx.Node]]:
    """Split at every point where one input-dependent value is alive: (nodes, input, output)."""
    pos = {n: i for i, n in enumerate(order)}
    last_use = {n: max(pos[u] for u in n.users if u not in const) for n in order
                if n not in const and any(u not in const for u in n.users)}
    segs, start, prev_val = [], 1, order[0]
    alive: set[fx.Node] = set()
    for i, n in enumerate(order[:-1]):  # the last node is the output
        if n in last_use:
            alive.add(n)
        alive = {v for v in alive if last_use[v] > i}
        if i > 0 and len(alive) == 1:
            (val,) = alive
            segs.append((order[start : i + 1], prev_val, val))
            start, prev_val = i + 1, val
    if start != len(order) - 1:
        raise UnsupportedModel("the graph does not end in one output tensor after its last cut")
    return segs


def _common_scope(nodes: list[fx.Node]) -> tuple[str, str]:
    stacks = [s for s in (_stack(n) for n in nodes) if s]
    if not stacks:
        return "", ""
    common = stacks[0]
    for s in stacks[1:]:
        k = 0
        while k < min(len(common), len(s)) and common[k] == s[k]:
            k += 1
        common = common[:k]
    return common[-1] if common else ("", "")


def _plan_units(segs, const: set[fx.Node], layers: dict[fx.Node, _Layer]) -> list[_Unit | tuple]:
    """Units and the glue segments between them, in order."""
    def dependent(nodes):
        return [n for n in nodes if n not in const]

    block_classes = set()
    for nodes, _, _ in segs:
        if len(dependent(nodes)) >= 2:
            path, cls = _common_scope(dependent(nodes))
            if path:
                block_classes.add(cls)

    def block_of(nodes) -> tuple[str, str] | None:
        stacks = [_stack(n) for n in dependent(nodes) if _stack(n)]
        if not stacks:
            return None
        for path, cls in stacks[0]:  # outermost first
            if path and cls in block_classes and all((path, cls) in s for s in stacks):
                return path, cls.rpartition(".")[2]
        return None

    plan: list = []
    for nodes, inp, out in segs:
        has_layer = any(n in layers for n in nodes)
        blk = block_of(nodes)
        if blk is not None:
            last = plan[-1] if plan else None
            if isinstance(last, _Unit) and last.block and last.name == blk[0]:
                last.nodes += nodes
                last.out = out
                continue
            plan.append(_Unit(blk[0], list(nodes), inp, out, block=True, kind=blk[1]))
        elif len(dependent(nodes)) >= 2 and has_layer:  # a skip connection written outside any module
            first = next(layers[n].path for n in nodes if n in layers)
            plan.append(_Unit(first + "_block", list(nodes), inp, out, block=True))
        elif has_layer:
            # one layer: two would need two input-dependent ops, a region handled above
            layer = next(layers[n] for n in nodes if n in layers)
            plan.append(_Unit(layer.path, list(nodes), inp, out, block=False))
        else:
            plan.append((nodes, inp, out))
    units = [u for u in plan if isinstance(u, _Unit)]
    for u in units:
        u.layers = [layers[n] for n in u.nodes if n in layers]
    for i, item in enumerate(plan):  # a block instance without layers (rare) is glue
        if isinstance(item, _Unit) and not item.layers:
            plan[i] = (item.nodes, item.inp, item.out)
    return plan


def _has_residual(nodes: list[fx.Node], const: set[fx.Node]) -> bool:
    return any(n.target in (aten.add.Tensor,) and sum(isinstance(a, fx.Node) and a not in const for a in n.args) == 2
               for n in nodes)


def _place_quantizers(plan, const, spec) -> dict[fx.Node, ActQuantizer]:
    """Set layers' output quantizers; return the block output quantizers by output node."""
    unit_out: dict[fx.Node, ActQuantizer] = {}
    for u in plan:
        if not isinstance(u, _Unit):
            continue
        if not u.block:
            (layer,) = u.layers
            users = list(layer.node.users)
            only_act = bool(users) and all(x.target in _UNFUSED_ACTS for x in users)
            if not only_act:
                layer.module.out_quant = ActQuantizer(spec.a_bits, spec.act_search)
            continue
        # every_layer's residual-branch ends exist only in a block with its residual add (as the
        # registry's _generic_block); the rule itself is QuantSpec.in_block_out_bits, both paths
        block_spec = spec if _has_residual(u.nodes, const) else replace(spec, every_layer=False)
        for layer in u.layers:
            bits = block_spec.in_block_out_bits(followed_by_activation=layer.fused_act)
            layer.module.out_quant = ActQuantizer(bits, block_spec.act_search) if bits is not None else None
        if not any(x.target in _NORMS for x in u.out.users):
            unit_out[u.out] = ActQuantizer(spec.a_bits, spec.act_search)
    return unit_out


def _on_grid(node, layers: dict[fx.Node, _Layer], unit_out: dict) -> bool:
    while isinstance(node, fx.Node):
        if node in unit_out:
            return True
        if node in layers:
            return layers[node].module.out_quant is not None
        if node.op == "call_function" and node.target in ON_GRID_OPS | _RELU:
            node = node.args[0]
            continue
        return False
    return False


def _add_input_quantizers(layers: dict[fx.Node, _Layer], unit_out, spec, first, classifier) -> None:
    for node, layer in layers.items():
        if node is first or node is classifier or (node.args and getattr(node.args[0], "op", "") == "placeholder"):
            continue
        if not _on_grid(node.args[0], layers, unit_out):
            layer.module.in_quant = ActQuantizer(spec.a_bits, spec.act_search)


def _relative(path: str, scope: str) -> str:
    return path[len(scope) + 1 :] if scope and path.startswith(scope + ".") else path


def _copy_into(graph: fx.Graph, n: fx.Node, env: dict, gm: fx.GraphModule, attrs: dict) -> fx.Node:
    """``n`` copied into ``graph`` (its constant and size inputs too, on first use)."""
    if n in env:
        return env[n]
    if n.op == "placeholder":  # a unit needing the model's input beside its own (_rebase_sizes found no other)
        raise UnsupportedModel("a part of the graph reads the model's input besides its first layer; "
                               "clcalib cannot split it into units")
    for a in n.all_input_nodes:
        _copy_into(graph, a, env, gm, attrs)
    if n.op == "get_attr":
        attrs[n.target] = fetch_attr(gm, n.target)
    env[n] = graph.node_copy(n, lambda a: env[a])
    return env[n]


def _outline(gm: fx.GraphModule, plan, unit_out) -> fx.GraphModule:
    top, env, attrs = fx.Graph(), {}, {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = top.placeholder(n.name)
            env[n].meta = dict(n.meta)
            break
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for item in plan:
        if not isinstance(item, _Unit):
            for n in item[0]:
                _copy_into(top, n, env, gm, attrs)
            continue
        body = _unit_body(gm, item)
        name = item.name
        while name in attrs:
            name += "_"
        attrs[name] = QuantUnit(body, None)
        attrs[name].out_quant = unit_out.get(item.out)
        env[item.out] = top.call_module(name, (env[item.inp],))
    top.output(env[output.args[0]] if not isinstance(output.args[0], (tuple, list)) else env[output.args[0][0]])
    return fx.GraphModule(attrs, top, class_name="CapturedModel")


def _unit_body(gm: fx.GraphModule, u: _Unit) -> nn.Module:
    if len(u.layers) == 1 and [n for n in u.nodes if n.op != "get_attr"] == [u.layers[0].node]:
        return u.layers[0].module  # a lone layer: the unit is the QuantLayer, as in the registry path
    g, attrs = fx.Graph(), {}
    env = {u.inp: g.placeholder("unit_input")}
    rel = {}
    for layer in u.layers:
        name = _relative(layer.path, u.name) or "layer"
        while name in rel.values() or name in attrs:
            name += "_"
        rel[layer.node] = name
        attrs[name] = layer.module
    for n in u.nodes:
        if n in rel:
            env[n] = g.call_module(rel[n], (env[n.args[0]],))
            env[n].meta = dict(n.meta)
        else:
            _copy_into(g, n, env, gm, attrs)
    g.output(env[u.out])
    return fx.GraphModule(attrs, g, class_name=u.kind if u.kind.isidentifier() else "UnitBody")


def convert_graph(gm: fx.GraphModule, spec) -> fx.GraphModule:
    """The quantized GraphModule, its units QuantUnit submodules (quantizers placed, not yet
    initialised). ``gm`` is consumed (its graph is rewritten)."""
    for n in list(gm.graph.nodes):  # the guard on input shapes that ep.module() adds
        if n.op == "call_module" and n.target == "_guards_fn":
            gm.graph.erase_node(n)
    layer_list = _fuse_layers(gm, spec)
    _rebase_sizes(gm.graph)
    layers = {lay.node: lay for lay in layer_list}
    if not layers:
        raise UnsupportedModel("the model has no Conv2d or Linear with constant weights: nothing to quantize")
    order, const = _order(gm.graph)
    if order[-1].op != "output":
        raise UnsupportedModel("the graph's output is not its last node")
    segs = _segments(order, const)
    plan = _plan_units(segs, const, layers)
    ordered_layers = [n for n in order if n in layers]
    first, classifier = ordered_layers[0], ordered_layers[-1]
    unit_out = _place_quantizers(plan, const, spec)
    _add_input_quantizers(layers, unit_out, spec, first, classifier)
    return _outline(gm, plan, unit_out)
