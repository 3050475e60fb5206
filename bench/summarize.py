"""Mean and spread over seeds of benchmark rows (JSON lines) as a markdown table.

    python -m bench.summarize bench/results/cpu.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

from clcalib.testing import REFERENCE

RES = Path(__file__).resolve().parent / "results"  # the committed rows
ANCHOR = REFERENCE / "peer_anchor.json"  # the official QDrop code's runs, beside the reference models
PEER_MODEL = "resnet18"  # the official runs in peer_anchor.json calibrated shared/reference/fmnist_resnet18 only
BITS_ORDER = ["W4A4", "W2A4", "W4A2", "W2A2"]
METHOD_ORDER = ["minmax", "mse", "adaround", "brecq", "qdrop", "pdquant"]


def load(paths) -> list[dict]:
    rows = []
    for p in paths:
        rows += [json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()]
    return rows


def committed(name: str) -> list[dict]:
    """Rows of results/<name>, none if the file was not made yet."""
    return load([RES / name]) if (RES / name).exists() else []


# fields a table shows in its headings and columns, or that every run sets for itself
_SHOWN = {"method", "w_bits", "a_bits", "iters", "seed", "device", "calib_size", "preprocess"}
# rows made before rows recorded their resolved config ran with these defaults of then
_BEFORE_CONFIG = {"act_range_p": 2.0, "cl_calib": {"critic": "nce", "lambda": 0.1, "every": 1, "hold": False}}
# keys a recorded config may lack (made before the key existed): what those rows ran with
_BEFORE_KEY = {"cl_calib": {"every": 1, "hold": False}}


@lru_cache(maxsize=1)
def defaults() -> dict:
    from clcalib.config import CalibConfig

    return CalibConfig().model_dump(mode="json", by_alias=True)


def _diff(cfg: dict, base: dict) -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            if d := _diff(v, base[k]):
                out[k] = d
        elif v != base.get(k):
            out[k] = v
    return out


def _merge(base: dict, over: dict) -> dict:
    return {**base, **{k: _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in over.items()}}


def settings(r: dict) -> dict:
    """What a row ran with beyond today's defaults (and beyond what a table shows): from its
    resolved config where recorded, else its overrides on top of the defaults of then. So a row
    keeps its meaning after a default moves, and rows that ran alike share a label whether
    they asked for a setting or got it by default."""
    cfg = _merge(_BEFORE_KEY, r["config"]) if r.get("config") else \
        _merge({**defaults(), **_BEFORE_CONFIG}, r.get("overrides", {}))
    d = _diff({k: v for k, v in cfg.items() if k not in _SHOWN}, defaults())
    if not (r.get("cl") or (cfg.get("cl_calib") or {}).get("enabled")):
        d.pop("cl_calib", None)  # the block of a run without CL-Calib changes nothing
    if d.get("cl_calib", {}).pop("enabled", None) is not None and not d["cl_calib"]:
        del d["cl_calib"]  # "+CL" in the label says it
    return d


def label(r: dict) -> str:
    s = settings(r)
    return r["method"] + ("+CL" if r.get("cl") else "") + (" " + json.dumps(s, sort_keys=True) if s else "")


def group(rows: list[dict]) -> dict:
    g = defaultdict(list)
    for r in rows:
        if "error" not in r:
            g[(r["model"], r["iters"], r["device"], label(r), r["bits"])].append(r)
    return g


MODEL_ORDER = ["resnet18", "mobilenet_v2"]


def by_model(key: tuple) -> tuple:
    """Sort key for tuples that start with a model name: the reference models first, in order."""
    return (MODEL_ORDER.index(key[0]) if key[0] in MODEL_ORDER else len(MODEL_ORDER), key)


def mean_seconds(rows: list[dict]) -> float | None:
    """Mean calibration seconds of the rows that ran every unit (a resumed run's seconds cover
    only the units after the resume point); None if there are none."""
    secs = [r["calib_seconds"] for r in rows if not r.get("resumed_units")]
    return statistics.mean(secs) if secs else None


def stat(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def table(rows: list[dict]) -> str:
    g = group(rows)
    out = []
    for model, iters, device in sorted({k[:3] for k in g}):
        bits = [b for b in BITS_ORDER if any(k[:3] == (model, iters, device) and k[4] == b for k in g)]
        names = sorted({k[3] for k in g if k[:3] == (model, iters, device)},
                       key=lambda n: (METHOD_ORDER.index(n.split("+")[0].split()[0]) if n.split("+")[0].split()[0] in METHOD_ORDER else 99, n))
        fp = next(r["fp_top1"] for k, rs in g.items() if k[0] == model for r in rs)
        out.append(f"\n### {model} (FP {fp:.2f}%), {iters} iterations per unit, {device}\n")
        out.append("top-1 % on the 10k test set, mean ± std over seeds (n seeds); calibration seconds (mean)\n")
        out.append("| method | " + " | ".join(bits) + " |")
        out.append("|---|" + "---|" * len(bits))
        for n in names:
            cells = []
            for b in bits:
                rs = g.get((model, iters, device, n, b), [])
                if not rs:
                    cells.append("-")
                    continue
                secs = mean_seconds(rs)
                cells.append(f"{stat([r['quant_top1'] for r in rs])} (n={len(rs)}; {'-' if secs is None else f'{secs:.0f}'} s)")
            out.append(f"| {n} | " + " | ".join(cells) + " |")
    out += ordering_checks(g)
    errors = [r for r in rows if "error" in r]
    if errors:
        out.append("\nFailed runs:\n")
        out += [f"- {r['model']} {r['bits']} {r['method']} seed {r['seed']}: {r['error']}" for r in errors]
    return "\n".join(out) + "\n"


def ordering_checks(g: dict) -> list[str]:
    """The issue's bar: minmax < adaround <= brecq <= qdrop at W2A4 and W4A2 (means over seeds)."""
    lines = []
    chain = ["minmax", "adaround", "brecq", "qdrop"]
    # one check per group of settings the four methods share (their labels' common suffix)
    suffixes = sorted({(k[:3], k[3][len("qdrop"):]) for k in g if k[3].startswith("qdrop") and not k[3].startswith("qdrop+")},
                      key=lambda x: (by_model(x[0]), x[1]))
    for (model, iters, device), suffix in suffixes:
        for bits in ("W2A4", "W4A2"):
            means = {}
            for m in chain:
                rs = g.get((model, iters, device, m + suffix, bits))
                if rs:
                    means[m] = statistics.mean(r["quant_top1"] for r in rs)
            if len(means) < len(chain):
                continue
            ok = means["minmax"] < means["adaround"] <= means["brecq"] <= means["qdrop"]
            txt = " < ".join(f"{m} {means[m]:.2f}" for m in chain)
            lines.append(f"- {model} {bits} ({iters} it, {device}{',' + suffix if suffix else ''}): {txt} -> {'holds' if ok else 'DOES NOT hold'}")
    return (["\nOrdering minmax < adaround <= brecq <= qdrop (means):\n"] + lines) if lines else []


if __name__ == "__main__":
    print(table(load(sys.argv[1:])))
