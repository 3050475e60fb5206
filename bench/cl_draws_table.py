"""The draws table: base vs base + CL per calibration draw (rows of bench/cl_draws.sh).

    python -m bench.cl_draws_table bench/results/cpu_cl_draws_iters500.jsonl

Per (model, bits, method, calib_size): each draw's top-1 without and with CL, mean ± std over
the draws, the paired difference per draw (same draw, same seed), and whether CL narrows the
spread over draws. Rows with an error are left out; a draw counts only once both runs exist."""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from bench.summarize import load


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def table(rows: list[dict]) -> str:
    cells: dict[tuple, dict[int, dict[bool, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if "error" in r:
            continue
        cfg = r["config"]
        draw = cfg["calib_seed"] if cfg.get("calib_seed") is not None else cfg["seed"]
        cells[(r["model"], r["bits"], r["method"], cfg["calib_size"], r["iters"])][draw][bool(r["cl"])] = r
    out = ["| model | bits | method | images | iters | draws | base | base + CL | paired diff per draw | mean diff | "
           "spread base / CL | time CL / base |", "|" + "---|" * 12]
    for key, draws in sorted(cells.items()):
        both = {d: v for d, v in sorted(draws.items()) if len(v) == 2}
        if not both:
            continue
        base = [v[False]["quant_top1"] for v in both.values()]
        cl = [v[True]["quant_top1"] for v in both.values()]
        diff = [c - b for b, c in zip(base, cl, strict=True)]
        per = ", ".join(f"{d}: {x:+.2f}" for d, x in zip(both, diff, strict=True))
        spread = (f"{statistics.stdev(base):.2f} / {statistics.stdev(cl):.2f}" if len(base) > 1 else "-")
        t = statistics.mean(v[True]["calib_seconds"] / v[False]["calib_seconds"] for v in both.values())
        model, bits, method, size, iters = key
        out.append(f"| {model} | {bits} | {method} | {size} | {iters} | {len(both)} | {_ms(base)} | {_ms(cl)} | {per} | "
                   f"{_ms(diff)} | {spread} | {t:.2f}x |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    print(table(load(p.parse_args(argv).files)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
