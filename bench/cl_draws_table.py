"""The draws table: base vs base + CL per calibration draw (rows of bench/cl_draws.sh).

    python -m bench.cl_draws_table bench/results/cpu_cl_draws_iters500.jsonl

Per (model, bits, method, calib_size, images supplied): each draw's top-1 without and with CL, mean ± std over
the draws, the paired difference per draw (same draw, same seed), and whether CL narrows the
spread over draws. CL rows that change the shipped form (their ``cl_calib`` overrides, e.g.
``rec_weight: 0``, L_CL alone) are their own rows against the same base runs. Rows with an error
are left out; a draw counts only once both runs exist."""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from bench.accuracy import supplied
from bench.summarize import load


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def _variant(r: dict) -> str:
    """The CL row's settings beyond the every-iteration form (e.g. rec_weight 0: L_CL alone; every 8,
    hold True); "" for it. ``every`` and ``hold`` are read from the resolved config, so a row keeps
    its label whichever form ``enabled: true`` selected when it ran (rows from before a key
    existed ran without it: every 1, no hold)."""
    block = {k: v for k, v in r.get("overrides", {}).get("cl_calib", {}).items() if k not in ("enabled", "every", "hold")}
    ran = (r.get("config") or {}).get("cl_calib") or {}
    every = ran.get("every", r.get("overrides", {}).get("cl_calib", {}).get("every", 1))
    if every > 1:
        block["every"] = every
        if ran.get("hold", False):
            block["hold"] = True
    return ", ".join(f"{k} {v}" for k, v in sorted(block.items()))


def table(rows: list[dict]) -> str:
    bases: dict[tuple, dict[int, dict]] = defaultdict(dict)
    cls: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        if "error" in r:
            continue
        cfg = r["config"]
        draw = cfg["calib_seed"] if cfg.get("calib_seed") is not None else cfg["seed"]
        key = (r["model"], r["bits"], r["method"], cfg["calib_size"], supplied(r), r["iters"])
        if r["cl"]:
            cls[(*key, _variant(r))][draw] = r
        else:
            bases[key][draw] = r
    out = ["| model | bits | method | images | iters | draws | base | base + CL | paired diff per draw | mean diff | "
           "CL above base | spread base / CL | time CL / base |", "|" + "---|" * 13]
    for key, draws in sorted(cls.items()):
        base_rows = bases.get(key[:6], {})
        both = {d: (base_rows[d], r) for d, r in sorted(draws.items()) if d in base_rows}
        if not both:
            continue
        base = [b["quant_top1"] for b, _ in both.values()]
        cl = [c["quant_top1"] for _, c in both.values()]
        diff = [c - b for b, c in zip(base, cl, strict=True)]
        per = ", ".join(f"{d}: {x:+.2f}" for d, x in zip(both, diff, strict=True))
        spread = (f"{statistics.stdev(base):.2f} / {statistics.stdev(cl):.2f}" if len(base) > 1 else "-")
        # time only where base and CL ran from the same code, one after the other (bench/cl_draws.sh):
        # a CL variant run sessions later against the old base rows saw another machine's load
        same = [c["calib_seconds"] / b["calib_seconds"] for b, c in both.values() if b.get("commit") == c.get("commit")]
        t = f"{statistics.mean(same):.2f}x" if same else "-"
        model, bits, method, size, supply, iters, variant = key
        images = f"{size} of {supply}" if supply != size else f"{size}"
        label = "base + CL" + (f" ({variant})" if variant else "")
        out.append(f"| {model} | {bits} | {method} | {images} | {iters} | {len(both)} | {_ms(base)} | {label}: {_ms(cl)} | "
                   f"{per} | {_ms(diff)} | {sum(x > 0 for x in diff)} of {len(diff)} | {spread} | {t} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    print(table(load(p.parse_args(argv).files)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
