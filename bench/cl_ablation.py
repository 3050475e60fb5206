"""The CL-Calib ablation of issue 4 as markdown: each base against base+CL, and the sweeps.

    python -m bench.cl_ablation --cl '{"mapping": "fp_tail", ...}' bench/results/cpu_cl_iters200.jsonl

(give only files whose base rows ran beside the CL rows: a base from another file would mix
machines and loads into the time ratio).

A CL row is identified by its ``overrides["cl_calib"]`` block (bench/cl_table.sh names every
setting it moves), a base row by ``cl: false`` and no overrides. "Beyond noise" is the issue's
test: |difference of means| > the larger of the two standard deviations. Time is the mean
calibration seconds of the rows; bench/cl_table.sh runs base and CL rows of a setting one after
the other, under the same load.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

from bench.summarize import BITS_ORDER, by_model, load, mean_seconds

SWEEP_MODEL = "resnet18"


def _cl_block(row: dict) -> dict | None:
    if not row.get("cl"):
        return None
    return row.get("overrides", {}).get("cl_calib", {})


def groups(rows: list[dict]) -> dict:
    g = defaultdict(list)
    for r in rows:
        if "error" in r:
            continue
        cl = _cl_block(r)
        if cl is None and r.get("overrides"):
            continue  # a base with changed settings is not a base
        g[(r["model"], r["iters"], r["bits"], r["method"], json.dumps(cl, sort_keys=True))].append(r)
    return g


def _stats(rs: list[dict]) -> tuple[float, float, float | None]:
    acc = [r["quant_top1"] for r in rs]
    sd = statistics.stdev(acc) if len(acc) > 1 else float("nan")
    return statistics.mean(acc), sd, mean_seconds(rs)


def _fmt(m: float, sd: float, n: int) -> str:
    return f"{m:.2f} ± {sd:.2f} (n={n})" if n > 1 else f"{m:.2f} (n=1)"


def compare(base: list[dict], cl: list[dict]) -> list[str]:
    """Cells: base, +CL, difference, beyond noise, base s, +CL s, ratio."""
    mb, sb, tb = _stats(base)
    mc, sc, tc = _stats(cl)
    d = mc - mb
    noise = max(sb, sc)
    verdict = "n/a (n=1)" if min(len(base), len(cl)) < 2 else ("**yes**" if abs(d) > noise else "no")
    if verdict == "**yes**" and d < 0:
        verdict = "**yes (worse)**"
    times = [f"{tb:.0f}", f"{tc:.0f}", f"{tc / tb:.2f}x"] if tb and tc else ["-", "-", "-"]
    return [_fmt(mb, sb, len(base)), _fmt(mc, sc, len(cl)), f"{d:+.2f}", f"{verdict} (noise {noise:.2f})", *times]


def main_table(g: dict, cl: dict) -> str:
    key_cl = json.dumps(cl, sort_keys=True)
    out = [f"CL setting: `{json.dumps(cl)}` on top of the base; top-1 % on the 10k test set, mean ± std over seeds.\n",
           "| model | bits | method | base | base + CL | difference | beyond noise | base s | +CL s | time ratio |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for model, iters in sorted({(k[0], k[1]) for k in g}, key=by_model):
        for bits in BITS_ORDER:
            for method in ("qdrop", "pdquant"):
                base = g.get((model, iters, bits, method, "null"))
                with_cl = g.get((model, iters, bits, method, key_cl))
                if base and with_cl:
                    out.append(f"| {model} ({iters} it) | {bits} | {method} | " + " | ".join(compare(base, with_cl)) + " |")
    return "\n".join(out) + "\n"


def sweep_bits(g: dict, cl: dict) -> list[str]:
    """Bit settings with CL rows other than the table's own setting."""
    key_cl = json.dumps(cl, sort_keys=True)
    return [b for b in BITS_ORDER if any(k[0] == SWEEP_MODEL and k[2] == b and k[4] not in ("null", key_cl) for k in g)]


def sweep_table(g: dict, cl: dict, bits: str) -> str:
    out = [f"{SWEEP_MODEL} {bits}, qdrop base; each row moves one knob of `{json.dumps(cl)}`.\n",
           "| CL setting | base (qdrop) | base + CL | difference | beyond noise | base s | +CL s | time ratio |",
           "|---|---|---|---|---|---|---|---|"]
    lines = []
    for (model, iters, b, method, key), rs in g.items():
        if (model, b, method) != (SWEEP_MODEL, bits, "qdrop") or key == "null":
            continue
        base = g.get((model, iters, b, method, "null"))
        if not base:
            continue
        block = json.loads(key)
        moved = {k: v for k, v in block.items() if cl.get(k) != v}
        label = ", ".join(f"{k} {v}" for k, v in moved.items()) or "(the table's setting)"
        lines.append((bool(moved), label, f"| {label} | " + " | ".join(compare(base, rs)) + " |"))
    return "\n".join(out + [line for *_, line in sorted(lines)]) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cl", required=True, help="the cl_calib block of the main table (JSON)")
    p.add_argument("files", nargs="+")
    a = p.parse_args(argv)
    rows = load(a.files)
    cl = json.loads(a.cl)
    print(report(rows, cl))


def report(rows: list[dict], cl: dict) -> str:
    g = groups(rows)
    sweeps = "\n".join(sweep_table(g, cl, b) for b in sweep_bits(g, cl))
    return "### Base vs base + CL-Calib\n\n" + main_table(g, cl) + "\n### Sweeps\n\n" + sweeps


if __name__ == "__main__":
    main()
