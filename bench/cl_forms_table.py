"""Issue 17's 2000-iteration table: a base method vs base + CL (one cl_calib block) per bit setting.

    python -m bench.cl_forms_table bench/results/cpu_cl_iters2000.jsonl \\
        --cl '{"mapping":"fp_tail","tail_end":"logits","critic":"relational","negatives":"batch","lambda":10.0,"tau":0.5}'

A base row is a row of the method without CL that ran with today's defaults (``bench.summarize.settings``
empty: so a row that asked for ``act_range_p`` 2.4 before it was the default counts); a CL row
names ``cl_calib`` in its overrides. "Beyond noise": |difference of means| > the larger std.
"""

from __future__ import annotations

import argparse
import json
import statistics

from bench.copy_base_rows import is_base
from bench.summarize import BITS_ORDER, load


def _ms(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.2f} (n=1)"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} (n={len(vals)})"


def table(rows: list[dict], cl: dict, model: str = "resnet18", method: str = "qdrop") -> str:
    ok = [r for r in rows if "error" not in r and r["model"] == model and r["method"] == method]
    out = [f"| bits | {method} | {method} + CL | seeds (CL) | difference | larger std | beyond noise |",
           "|---|---|---|---|---|---|---|"]
    for bits in BITS_ORDER:
        base = [r for r in ok if is_base(r, model, method, bits)]
        with_cl = [r for r in ok if r["bits"] == bits and r.get("cl") and r.get("overrides", {}).get("cl_calib") == cl]
        if not base or not with_cl:
            continue
        b = [r["quant_top1"] for r in base]
        c = [r["quant_top1"] for r in sorted(with_cl, key=lambda r: r["seed"])]
        d = statistics.mean(c) - statistics.mean(b)
        sd = max(statistics.stdev(v) if len(v) > 1 else float("nan") for v in (b, c))
        verdict = "n/a (n=1)" if min(len(b), len(c)) < 2 else ("yes" if abs(d) > sd else "no")
        if verdict == "yes" and d < 0:
            verdict = "yes (worse)"
        seeds = ", ".join(f"{r['seed']}: {r['quant_top1']:.2f} ({r['calib_seconds']:.0f} s)" for r in sorted(with_cl, key=lambda r: r["seed"]))
        out.append(f"| {bits} | {_ms(b)} | {_ms(c)} | {seeds} | {d:+.2f} | {sd:.2f} | {verdict} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--cl", required=True, help="the cl_calib block of the CL rows (JSON)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--method", default="qdrop")
    a = p.parse_args(argv)
    print(table(load(a.files), json.loads(a.cl), a.model, a.method))


if __name__ == "__main__":
    main()
