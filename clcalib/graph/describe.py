"""What calibration will do to a model, before any is spent: its reconstruction units in order,
their layers (shape, parameters, weight bits) and where every activation quantizer sits."""

from __future__ import annotations

from clcalib.graph.partition import QuantModel
from clcalib.quant.layer import QuantLayer


def describe(qm: QuantModel) -> list[dict]:
    """One entry per unit, in execution order. ``out_bits``: the bits of the quantizer on the
    layer's (or the unit's) output; None where the value stays FP."""
    units = []
    for name, unit in zip(qm.unit_names, qm.units(), strict=True):
        body = unit.body
        layers = [(n, m) for n, m in unit.named_modules() if isinstance(m, QuantLayer)]
        units.append({
            "unit": name.removeprefix("model."),
            "kind": type(body).__name__ if not isinstance(body, QuantLayer) else ("conv" if body.is_conv else "linear"),
            "layers": [{
                "name": f"{name}.{n}".removeprefix("model.").replace(".body", "").rstrip("."),
                "kind": "conv" if m.is_conv else "linear",
                "shape": list(m.weight.shape),
                "params": m.weight.numel() + m.bias.numel(),
                "w_bits": m.wq.bits,
                "in_bits": m.in_quant.bits if m.in_quant is not None else None,
                "out_bits": m.out_quant.bits if m.out_quant is not None else None,
            } for n, m in layers],
            "out_bits": unit.out_quant.bits if unit.out_quant is not None else None,
        })
    return units


def render(units: list[dict]) -> str:
    rows = [("unit / layer", "kind", "weight shape", "params", "W bits", "input quantizer", "output quantizer")]
    total = 0
    for u in units:
        rows.append((u["unit"], u["kind"], "", "", "", "", f"A{u['out_bits']}" if u["out_bits"] else ""))
        for la in u["layers"]:
            total += la["params"]
            rows.append(("  " + la["name"], la["kind"], "x".join(map(str, la["shape"])), f"{la['params']:,}",
                         f"W{la['w_bits']}", f"A{la['in_bits']}" if la["in_bits"] else "",
                         f"A{la['out_bits']}" if la["out_bits"] else "FP"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    n_layers = sum(len(u["layers"]) for u in units)
    lines.append(f"{len(units)} units, {n_layers} quantized layers, {total:,} parameters "
                 "(BatchNorm folded). The input image and the logits stay FP.")
    return "\n".join(lines)
