"""Figures for bench/RESULTS.md from the committed result rows (today's defaults only):

- ``figures/resnet18_schedule.png``: resnet18 top-1 against iterations per unit (200, 2000,
  20000) for brecq and qdrop at each bit setting, mean ± std over seeds, with the official
  QDrop code's runs (shared/reference/peer_anchor.json) and the FP model;
- ``figures/methods_200.png``: every method at 200 iterations, both models.

    pip install -e '.[bench]' && python -m bench.plot
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402

from bench.summarize import (  # noqa: E402
    ANCHOR,
    BITS_ORDER,
    METHOD_ORDER,
    MODEL_ORDER,
    PEER_MODEL,
    committed,
    group,
)

OUT = Path(__file__).resolve().parent / "figures"
SCHEDULE_FILES = ["cpu_iters200_p24.jsonl", "cpu_iters2000.jsonl", "cpu_iters20000.jsonl"]
COLORS = {"minmax": "#999999", "mse": "#bbbb55", "adaround": "#66aa66", "brecq": "#4477aa", "qdrop": "#cc5533"}
# PNGs without the matplotlib version in them, so an unchanged figure regenerates unchanged
SAVE = {"dpi": 110, "metadata": {"Software": None}}


def _today(rows: list[dict], device: str = "cpu") -> dict:
    """Groups of rows that ran with today's defaults (plain method labels), on one device."""
    return {k: rs for k, rs in group(rows).items() if k[3] in METHOD_ORDER and k[2] == device}


def _mean_sd(rs: list[dict]) -> tuple[float, float]:
    acc = [r["quant_top1"] for r in rs]
    return statistics.mean(acc), (statistics.stdev(acc) if len(acc) > 1 else 0.0)


def schedule_figure(rows: list[dict], peers: list[dict]) -> plt.Figure:
    g = _today(rows)
    fig, axes = plt.subplots(1, len(BITS_ORDER), figsize=(13, 3.4), sharex=True)
    fp = next(r["fp_top1"] for r in rows if r["model"] == PEER_MODEL)
    for ax, bits in zip(axes, BITS_ORDER, strict=True):
        for method in ("brecq", "qdrop"):
            pts = sorted((k[1], *_mean_sd(rs), len(rs)) for k, rs in g.items() if k[0] == PEER_MODEL and k[3] == method and k[4] == bits)
            if pts:
                it, m, sd, n = zip(*pts, strict=True)
                ax.errorbar(it, m, yerr=sd, marker="o", capsize=3, color=COLORS[method], label=method)
                for x, y, k in zip(it, m, n, strict=True):
                    ax.annotate(f"n={k}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color=COLORS[method])
        for p in peers:
            if p["bits"] == bits:
                ax.plot([p["iters"]], [p["quant_acc"]], marker="*", markersize=11, color="black", linestyle="none",
                        label="official QDrop (1 run)")
        ax.axhline(fp, color="gray", linestyle=":", linewidth=1, label=f"FP {fp:.2f}")
        ax.set_xscale("log")
        ax.set_title(f"{PEER_MODEL} {bits}")
        ax.set_xlabel("iterations per unit")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 % (10k test, reloaded checkpoint)")
    handles = dict(zip(*reversed(axes[1].get_legend_handles_labels()), strict=True))  # label -> artist, once each
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("Accuracy against schedule length, today's defaults, CPU; error bars: std over seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def methods_figure(rows: list[dict]) -> plt.Figure:
    g = _today(rows)
    models = [m for m in MODEL_ORDER if any(k[0] == m for k in g)]
    fig, axes = plt.subplots(1, len(models), figsize=(12, 3.6), squeeze=False)
    methods = [m for m in METHOD_ORDER if any(k[3] == m for k in g)]
    width = 0.8 / len(methods)
    for ax, model in zip(axes[0], models, strict=True):
        for j, method in enumerate(methods):
            xs, ms, sds = [], [], []
            for i, bits in enumerate(BITS_ORDER):
                rs = g.get((model, 200, "cpu", method, bits))
                if rs:
                    m, sd = _mean_sd(rs)
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ms.append(m)
                    sds.append(sd)
            ax.bar(xs, ms, width, yerr=sds, capsize=2, color=COLORS.get(method), label=method)
        fp = next(r["fp_top1"] for r in rows if r["model"] == model)
        ax.axhline(fp, color="gray", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(BITS_ORDER)), BITS_ORDER)
        ax.set_ylim(0, 100)
        ax.set_title(f"{model} (FP {fp:.2f}), 200 iterations per unit")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("top-1 %")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def main() -> None:
    OUT.mkdir(exist_ok=True)
    rows = [r for f in SCHEDULE_FILES for r in committed(f) if "error" not in r]
    peers = json.loads(ANCHOR.read_text())["runs"] if ANCHOR.is_file() else []
    table = [r for r in rows if r["iters"] == 200]
    if not any(r["model"] == PEER_MODEL for r in rows) or not table:
        print("figures not drawn: no result rows yet", file=sys.stderr)
        return
    schedule_figure(rows, peers).savefig(OUT / "resnet18_schedule.png", **SAVE)
    methods_figure(table).savefig(OUT / "methods_200.png", **SAVE)
    print(f"wrote {OUT}/resnet18_schedule.png, {OUT}/methods_200.png")


if __name__ == "__main__":
    main()
