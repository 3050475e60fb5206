"""The sensitivity table as text, for ``clcalib sensitivity``."""

from __future__ import annotations

from clcalib.mixed.sensitivity import SiteCost


def render(costs: list[SiteCost], check: dict | None) -> str:
    widths = sorted({b for c in costs for b in c.cost})
    evaluated = any(c.top1_drop for c in costs)
    head = ["site", "kind", "size", "bits now"] + [f"KL @{b}" for b in widths]
    head += [f"top-1 drop @{b}" for b in widths] if evaluated else []
    rows = [head]
    for c in costs:
        row = [c.name, c.kind + (" (first/last)" if c.fixed else ""), f"{c.size:,}", str(c.bits)]
        row += [f"{c.cost[b]:.2e}" if b in c.cost else "" for b in widths]
        row += [f"{c.top1_drop[b]:+.2f}" if b in c.top1_drop else "" for b in widths] if evaluated else []
        rows.append(row)
    cols = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, cols, strict=True)).rstrip() for r in rows]
    lines.append("KL: mean KL divergence of the predictions from FP with that site alone quantized (nearest "
                 "rounding), on the calibration images; size: parameters (weights) or elements per image "
                 "(activations).")
    if check is not None:
        lines.append(f"KL against the real top-1 drop on the evaluation images: Spearman {check['spearman']:.2f}; of "
                     f"the {check['pairs']} pairs whose drops differ by {check['margin_points']:g} point or more, "
                     f"{100 * (check['pairs_in_order'] or 0):.0f} % are in the same order by KL")
    return "\n".join(lines)
