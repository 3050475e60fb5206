"""Issue 16's tables from one bench/gpu_issue16.sh call's rows (the folder it wrote to $OUT):

    python -m bench.gpu_issue16_table /path/to/out > bench/RESULTS_gpu16.md

Times are compared only inside one call (one card, one after the other)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(folder: Path, name: str) -> list[dict]:
    p = folder / f"{name}.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def one(folder: Path, name: str) -> dict | None:
    got = [r for r in rows(folder, name) if not r.get("error")]
    return got[-1] if got else None


def fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def main(argv=None) -> int:
    folder = Path((argv or sys.argv[1:])[0])
    out = ["# Issue 16: the reconstruction step on one GPU", ""]
    env = folder / "env.txt"
    if env.is_file():
        out += [f"Card and torch: `{env.read_text().strip()}`", ""]
    eq = folder / "equivalence.txt"
    if eq.is_file():
        out += [f"Graph replays against eager steps (tests/test_recon_step.py, CUDA cases): `{eq.read_text().strip().splitlines()[-1]}`", ""]

    rates = rows(folder, "rates")
    if rates:
        out += ["## Iterations per second (qdrop W4A4, 1024 images, loop only)", "",
                "| model | eager it/s | graph it/s | speed-up | GPU busy eager | GPU busy graph |", "|---|---|---|---|---|---|"]
        for model in dict.fromkeys(r["model"] for r in rates):
            e = next((r for r in rates if r["model"] == model and r["step_capture"] == "off"), None)
            g = next((r for r in rates if r["model"] == model and r["step_capture"] == "auto"), None)
            up = g["iters_per_s"] / e["iters_per_s"] if e and g else None
            out.append(f"| {model} | {fmt(e and e['iters_per_s'], 1)} | {fmt(g and g['iters_per_s'], 1)} | {fmt(up)}x | "
                       f"{fmt(e and e['gpu_busy_percent'], 0)} % | {fmt(g and g['gpu_busy_percent'], 0)} % |")
        out.append("")

    out += ["## Against the official QDrop code, one after the other on the same card", "",
            "| setting | clcalib s | official s | official / clcalib | top-1 clcalib | top-1 official |", "|---|---|---|---|---|---|"]
    for label, ours, theirs in (("resnet18 W2A4 2000 it, 28 px", "r18_W2A4_2000", "peer_r18_W2A4_2000"),
                                ("resnet18 W4A4 200 it, 224 px (times only)", "r18_W4A4_200_224px", "peer_r18_W4A4_200_224px")):
        a, b = one(folder, ours), one(folder, theirs)
        speed = b["calib_seconds"] / a["calib_seconds"] if a and b else None
        out.append(f"| {label} | {fmt(a and a['calib_seconds'], 1)} | {fmt(b and b['calib_seconds'], 1)} | {fmt(speed)}x | "
                   f"{fmt(a and a['quant_top1'])} | {fmt(b and b['quant_top1'])} |")
    out.append("")

    out += ["## Other runs", "", "| run | calibration s | top-1 | peak GPU memory GiB | steps |", "|---|---|---|---|---|"]
    for name in ("mbv2_W2A4_2000", "r18_W4A4_20000", "r18_W2A4_20000", "r50_W4A4_200_224px", "cl17_W2A2_2000"):
        for r in rows(folder, name):
            if r.get("error"):
                out.append(f"| {name} seed {r.get('seed')} | failed: {r['error'][:80]} | | | |")
                continue
            mem = r.get("peak_device_memory_bytes")
            steps = ",".join(sorted(set(r.get("unit_steps") or [])))
            out.append(f"| {name} seed {r['seed']} | {fmt(r['calib_seconds'], 1)} | {fmt(r['quant_top1'])} | "
                       f"{fmt(mem / 2**30 if mem else None)} | {steps} |")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
