"""Tables of the mixed-precision runs (bench/mixed_w3.sh, bench/mixed_more.sh, bench/mixed_target.sh):
mean and spread over seeds, and the paired difference (same seed, mixed minus uniform).

    python -m bench.mixed_table bench/results/cpu_mixed_w3_iters500.jsonl bench/results/cpu_mixed_a3_iters500.jsonl \
        bench/results/cpu_mixed_target_iters500.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

W8_BYTES = {"resnet18": 11215322, "mobilenet_v2": 2356154}  # every quantized layer at 8 bits (clcalib.quant.sites)


def _ms(xs: list[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.2f} (1 seed)"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f} ({len(xs)} seeds)"


def _kind(r: dict) -> str:
    b = (r.get("overrides") or {}).get("budget")
    if not b:
        return f"uniform {r['bits']}"
    if b.get("a_bits_avg") is not None and b.get("weight_mb") is not None:  # both at uniform W3A{a}'s sizes
        return f"mixed weights at {b['weight_mb']:g} MB and activations at average {b['a_bits_avg']:g} bits"
    if b.get("a_bits_avg") is not None:
        return f"mixed activations, average {b['a_bits_avg']:g} bits (W{r['bits'][1]})"
    return f"mixed weights at {b['weight_mb']:g} MB ({r['bits'][2:]})"


def budget_table(rows: list[dict]) -> str:
    groups: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        if "error" in r or (r.get("overrides") or {}).get("target"):
            continue
        groups[(r["model"], r["iters"], _kind(r))][r["seed"]] = r
    out = ["| model | what | weights (MB) | top-1 % | paired difference vs uniform, same seed |", "|---|---|---|---|---|"]
    for (model, iters, kind), by_seed in sorted(groups.items()):
        top = [r["quant_top1"] for r in by_seed.values()]
        mb = next(iter(by_seed.values()))["weight_bytes"] / 1e6
        paired = ""
        if kind.startswith("mixed weights"):
            acts = f"A{kind.rsplit(' ', 2)[1]}" if kind.endswith(" bits") else kind[-3:-1]
            base = groups.get((model, iters, f"uniform W3{acts}"), {})
            d = [by_seed[s]["quant_top1"] - base[s]["quant_top1"] for s in sorted(by_seed) if s in base]
            paired = ", ".join(f"{x:+.2f}" for x in d) + (f" (mean {statistics.mean(d):+.2f})" if d else "")
        out.append(f"| {model} | {kind}, {iters} it | {mb:.3f} | {_ms(top)} | {paired} |")
    return "\n".join(out)


def target_table(rows: list[dict]) -> str:
    out = ["| model | FP top-1 % | returned top-1 % | drop | weights (MB) | of W8 | candidates (avg bits: top-1) | search wall time |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = ((r.get("mixed_precision") or {}).get("search")) or {}
        if not s:
            continue
        probes = ", ".join(f"{p['w_bits_avg']:g}: {p['top1']:.2f}" if p["top1"] is not None else f"{p['w_bits_avg']:g}: stopped"
                           for p in s["probes"])
        out.append(f"| {r['model']} | {r['fp_top1']:.2f} | {r['quant_top1']:.2f} | {r['fp_top1'] - r['quant_top1']:.2f} | "
                   f"{r['weight_bytes'] / 1e6:.3f} | {100 * r['weight_bytes'] / W8_BYTES[r['model']]:.0f} % | {probes} | "
                   f"{r['wall_seconds']:.0f} s |")
    return "\n".join(out)


def main(paths: list[str]) -> int:
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    print(budget_table(rows))
    print()
    print(target_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
