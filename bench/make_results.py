"""Write bench/RESULTS.md from the committed result files (numbers only from runs in results/).

    python -m bench.make_results
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from bench import gpu_speed_table
from bench.cl_ablation import compare, main_table
from bench.cl_ablation import groups as cl_groups
from bench.cl_ablation import report as cl_report
from bench.summarize import (
    ANCHOR,
    BITS_ORDER,
    PEER_MODEL,
    RES,
    by_model,
    committed,
    defaults,
    load,
    settings,
    stat,
    table,
)

HERE = Path(__file__).resolve().parent
# the cl_calib block of the CL-Calib table (bench/cl_table.sh's CL)
CL_TABLE = {"mapping": "fp_tail", "tail_end": "logits", "critic": "nce", "negatives": "batch", "lambda": 0.1, "tau": 0.5}


def _qdrop_range_p(r: dict) -> float | None:
    """act_range_p of a qdrop row that ran with today's defaults otherwise; None for any other row."""
    if r.get("method") != "qdrop" or r.get("cl") or "error" in r:
        return None
    s = settings(r)
    return None if set(s) - {"act_range_p"} else s.get("act_range_p", defaults()["act_range_p"])


def anchor_rows(gpu_rows: list[dict], cpu_rows: list[dict]) -> str:
    if not ANCHOR.is_file():
        return "(peer_anchor.json not found beside the checkout)\n"
    peers = json.loads(ANCHOR.read_text())["runs"]
    columns = [("GPU, act_range_p 2.0", gpu_rows, 2.0), ("CPU, act_range_p 2.0", cpu_rows, 2.0), ("CPU, act_range_p 2.4 (default)", cpu_rows, 2.4)]
    out = ["| bits | official QDrop, 2000 it, CPU (1 run) | " + " | ".join(f"clcalib qdrop, {c[0]} | difference" for c in columns) + " |",
           "|---|---|" + "---|---|" * len(columns)]
    for p in peers:
        cells = [f"{p['quant_acc']:.2f}"]
        for _, rows, range_p in columns:
            ours = [r["quant_top1"] for r in rows
                    if r.get("model") == PEER_MODEL and _qdrop_range_p(r) == range_p and r.get("bits") == p["bits"] and r.get("iters") == p["iters"]]
            if not ours:
                cells += ["-", "-"]
                continue
            cells += [f"{stat(ours)} (n={len(ours)})", f"{statistics.mean(ours) - p['quant_acc']:+.2f}"]
        out.append(f"| {p['bits']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def side_by_side() -> str:
    """clcalib and the official QDrop code started together on one machine (results/cpu_side_by_side*)."""
    ours_path, peer_path = RES / "cpu_side_by_side.jsonl", RES / "cpu_side_by_side_peer.json"
    if not (ours_path.exists() and peer_path.exists()):
        return "(not run)\n"
    ours, peer = load([ours_path])[0], json.loads(peer_path.read_text())
    out = ["| code | bits | iterations | seed | calibration s | top-1 % (10k test) |", "|---|---|---|---|---|---|",
           f"| clcalib qdrop | {ours['bits']} | {ours['iters']} | {ours['seed']} | **{ours['calib_seconds']:.0f}** | {ours['quant_top1']:.2f} |",
           f"| official QDrop | {peer['bits']} | {peer['iters']} | {peer['seed']} | {peer['calib_seconds']:.0f} | {peer['quant_top1']:.2f} |"]
    d = peer["diagnostics"]
    out.append(f"\nRatio {ours['calib_seconds'] / peer['calib_seconds']:.2f}x. CPU: {ours.get('cpu', '?')}. Official: "
               f"{d['before_recon_s']:.0f} s before reconstruction + {d['recon_cache_s']:.0f} s caching + "
               f"{d['loop_s_per_iter_all_units']:.3f} s per iteration (all units), so about "
               f"{d['before_recon_s'] + d['recon_cache_s'] + 20000 * d['loop_s_per_iter_all_units']:.0f} s at 20000 iterations.")
    return "\n".join(out) + "\n"


def variant_effect(rows: list[dict], base: dict, variant: dict, brecq: list[dict]) -> str:
    """qdrop with the ``variant`` overrides against qdrop with the ``base`` ones, rows of one file
    (same machine, same seeds); brecq beside them."""
    g = defaultdict(list)
    for r in rows + brecq:
        if "error" not in r and not r.get("cl"):
            g[(r["model"], r["iters"], r["bits"], r["method"], json.dumps(r.get("overrides", {}), sort_keys=True))].append(r)
    b_key, v_key = json.dumps(base, sort_keys=True), json.dumps(variant, sort_keys=True)
    out = [f"| model | bits | qdrop `{b_key}` | qdrop `{v_key}` | difference | beyond noise | base s | variant s | time ratio | brecq |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for model, iters in sorted({k[:2] for k in g}, key=by_model):
        for bits in BITS_ORDER:
            rb, rv = g.get((model, iters, bits, "qdrop", b_key)), g.get((model, iters, bits, "qdrop", v_key))
            if rb and rv:
                acc = [r["quant_top1"] for r in g.get((model, iters, bits, "brecq", "{}"), [])]
                ref = f"{stat(acc)} (n={len(acc)})" if acc else "-"
                out.append(f"| {model} ({iters} it) | {bits} | " + " | ".join(compare(rb, rv)) + f" | {ref} |")
    return "\n".join(out) + "\n"


def render() -> str:
    """RESULTS.md as the committed rows and RESULTS.head.md make it."""
    cpu = load([RES / "cpu_iters200.jsonl"])
    gpu = load([RES / "gpu_h100_iters2000.jsonl"])
    cpu2000 = committed("cpu_iters2000.jsonl")
    text = (HERE / "RESULTS.head.md").read_text()
    text = text.replace("{{ANCHOR}}", anchor_rows(gpu, cpu2000 + committed("cpu_side_by_side.jsonl"))).replace("{{GPU}}", table(gpu)).replace("{{CPU}}", table(cpu))
    text = text.replace("{{CPU2000}}", table(cpu2000) if cpu2000 else "(not finished)\n")
    text = text.replace("{{SIDE}}", side_by_side())
    cl_rows = committed("cpu_cl_iters200.jsonl")
    text = text.replace("{{CL}}", cl_report(cl_rows, CL_TABLE) if cl_rows else "(not run)\n")
    cl24 = committed("cpu_cl_iters200_p24.jsonl")
    text = text.replace("{{CL_P24}}", main_table(cl_groups(cl24), CL_TABLE) if cl24 else "(not run)\n")
    cpu20000 = committed("cpu_iters20000.jsonl")
    text = text.replace("{{CPU20000}}", table(cpu20000) if cpu20000 else "(not finished)\n")
    scope, brecq = committed("cpu_qdrop_drop_scope_iters200.jsonl"), [r for r in cpu if r["method"] == "brecq"]
    text = text.replace("{{DROP}}", variant_effect(scope, {"drop_scope": "input"}, {"drop_scope": "all"}, brecq))
    text = text.replace("{{ACT_P}}", variant_effect(scope, {"drop_scope": "input"}, {"act_range_p": 2.4}, brecq))
    p24 = committed("cpu_iters200_p24.jsonl")
    text = text.replace("{{CPU_P24}}", table(p24) if p24 else "(not run)\n")
    xeon = committed("cpu_iters200_p24_xeon.jsonl")
    text = text.replace("{{CPU_P24_XEON}}", table(xeon) if xeon else "(not run)\n")
    speed = RES / "gpu_h200_speed.jsonl"
    text = text.replace("{{GPU_SPEED}}", gpu_speed_table.render(gpu_speed_table.load_runs(speed), "###") if speed.exists() else "(not run)\n")
    return text


def main() -> None:
    (HERE / "RESULTS.md").write_text(render())
    try:  # the figures RESULTS.md shows come from the same rows: keep them in step
        from bench import plot
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":
            raise
        print("figures not redrawn: matplotlib is missing (pip install -e '.[bench]')", file=sys.stderr)
    else:
        plot.main()


if __name__ == "__main__":
    main()
