"""Write bench/RESULTS.md from the committed result files (numbers only from runs in results/).

    python -m bench.make_results
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.summarize import load, table

HERE = Path(__file__).resolve().parent
RES = HERE / "results"
ANCHOR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "peer_anchor.json"


def anchor_rows(gpu_rows: list[dict]) -> str:
    if not ANCHOR.is_file():
        return "(peer_anchor.json not found beside the checkout)\n"
    peers = json.loads(ANCHOR.read_text())["runs"]
    out = ["| bits | official QDrop, 2000 it (1 run) | clcalib qdrop, 2000 it, GPU (mean ± std, n) | difference |", "|---|---|---|---|"]
    for p in peers:
        ours = [r["quant_top1"] for r in gpu_rows if r.get("method") == "qdrop" and r.get("bits") == p["bits"]
                and r.get("iters") == p["iters"] and not r.get("cl") and "error" not in r]
        if not ours:
            out.append(f"| {p['bits']} | {p['quant_acc']:.2f} | - | - |")
            continue
        m = statistics.mean(ours)
        sd = f" ± {statistics.stdev(ours):.2f}" if len(ours) > 1 else ""
        out.append(f"| {p['bits']} | {p['quant_acc']:.2f} | {m:.2f}{sd} (n={len(ours)}) | {m - p['quant_acc']:+.2f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    cpu = load([RES / "cpu_iters200.jsonl"])
    gpu = load([RES / "gpu_h100_iters2000.jsonl"])
    cpu2000 = load([RES / "cpu_iters2000.jsonl"]) if (RES / "cpu_iters2000.jsonl").exists() else []
    text = (HERE / "RESULTS.head.md").read_text()
    text = text.replace("{{ANCHOR}}", anchor_rows(gpu)).replace("{{GPU}}", table(gpu)).replace("{{CPU}}", table(cpu))
    text = text.replace("{{CPU2000}}", table(cpu2000) if cpu2000 else "(not finished)\n")
    (HERE / "RESULTS.md").write_text(text)


if __name__ == "__main__":
    main()
