"""The GPU speed tables from bench/gpu_speed.sh's rows: the folder one call wrote (unpacked from
$OUT/gpu_speed.tgz), or the committed rows of several calls (bench/results/gpu_h200_speed.jsonl,
each row with its ``run`` name; bench.make_results renders these into RESULTS.md):

    python -m bench.gpu_speed_table /path/to/unpacked/out
    python -m bench.gpu_speed_table bench/results/gpu_h200_speed.jsonl

Where a run has rows from several calls, the last one that did not fail is shown."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _lines(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def load_runs(path: Path) -> dict[str, list[dict]]:
    """Rows by run name: a call's folder holds <run>.jsonl files, the committed file names each
    row's run."""
    if path.is_file():
        runs: dict[str, list[dict]] = {}
        for r in _lines(path):
            runs.setdefault(r["run"], []).append(r)
        return runs
    return {p.stem: _lines(p) for p in sorted(path.glob("*.jsonl"))}


def one(runs: dict, name: str) -> dict | None:
    got = [r for r in runs.get(name, []) if not r.get("error")]
    return got[-1] if got else None


def fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render(runs: dict[str, list[dict]], level: str = "##") -> str:
    out = []
    rates = runs.get("rates", [])
    if rates:
        out += [f"{level} Iterations per second (qdrop W4A4, 1024 images, loop only)", "",
                "| model | eager it/s | graph it/s | speed-up | GPU busy eager | GPU busy graph |", "|---|---|---|---|---|---|"]
        for model in dict.fromkeys(r["model"] for r in rates):
            e = next((r for r in rates if r["model"] == model and r["step_capture"] == "off"), None)
            g = next((r for r in rates if r["model"] == model and r["step_capture"] == "auto"), None)
            up = g["iters_per_s"] / e["iters_per_s"] if e and g else None
            out.append(f"| {model} | {fmt(e and e['iters_per_s'], 1)} | {fmt(g and g['iters_per_s'], 1)} | {fmt(up)}x | "
                       f"{fmt(e and e['gpu_busy_percent'], 0)} % | {fmt(g and g['gpu_busy_percent'], 0)} % |")
        out.append("")

    out += [f"{level} Against the official QDrop code", "",
            "| setting | clcalib s | official s | official / clcalib | top-1 clcalib | top-1 official |", "|---|---|---|---|---|---|"]
    for label, ours, theirs in (("resnet18 W2A4 2000 it, 28 px", "r18_W2A4_2000", "peer_r18_W2A4_2000"),
                                ("resnet18 W4A4 200 it, 224 px (times only)", "r18_W4A4_200_224px", "peer_r18_W4A4_200_224px")):
        a, b = one(runs, ours), one(runs, theirs)
        speed = b["calib_seconds"] / a["calib_seconds"] if a and b else None
        out.append(f"| {label} | {fmt(a and a['calib_seconds'], 1)} | {fmt(b and b['calib_seconds'], 1)} | {fmt(speed)}x | "
                   f"{fmt(a and a['quant_top1'])} | {fmt(b and b['quant_top1'])} |")
    out.append("")

    cl_runs = (("r18_W2A4_2000_cl", "r18_W2A4_2000"), ("mbv2_W2A4_2000_cl", "mbv2_W2A4_2000"),
               ("mbv2_W2A4_2000_cl_tail2", "mbv2_W2A4_2000"), ("mbv2_W2A4_2000_cl_hold8", "mbv2_W2A4_2000"))
    if any(name in runs for name, _ in cl_runs):  # runs from before these rows existed have none
        out += [f"{level} CL-Calib's overhead (same card, same call)", "", "| run | calibration s | vs without CL | top-1 |",
                "|---|---|---|---|"]
        for name, base in cl_runs:
            a, b = one(runs, name), one(runs, base)
            ratio = a["calib_seconds"] / b["calib_seconds"] if a and b else None
            out.append(f"| {name} | {fmt(a and a['calib_seconds'], 1)} | {fmt(ratio)}x | {fmt(a and a['quant_top1'])} |")
        out.append("")

    phased = [(name, one(runs, name)) for name in ("r18_W2A4_2000", "r18_W4A4_200_224px", "mbv2_W2A4_2000", "r50_W4A4_200_224px")]
    phased = [(name, r) for name, r in phased if r and r.get("phase_seconds")]
    if phased:  # where calibration_seconds went (clcalib.recon.phases; rows from before have none)
        from clcalib.recon.phases import PHASES

        out += [f"{level} Where the calibration time went (s)", "", "| run | total | " + " | ".join(PHASES) + " |",
                "|---|---|" + "---|" * len(PHASES)]
        for name, r in phased:
            out.append(f"| {name} | {fmt(r['calib_seconds'], 1)} | "
                       + " | ".join(fmt(r["phase_seconds"].get(k)) for k in PHASES) + " |")
        out.append("")

    out += [f"{level} Other runs", "", "| run | calibration s | top-1 | peak GPU memory GiB | steps |", "|---|---|---|---|---|"]
    for name in ("mbv2_W2A4_2000", "r18_W2A4_2000_cl", "r18_W4A4_20000", "r18_W2A4_20000", "r50_W4A4_200_224px"):
        for r in runs.get(name, []):
            if r.get("error"):
                out.append(f"| {name} seed {r.get('seed')} | failed: {r['error'][:80]} | | | |")
                continue
            mem = r.get("peak_device_memory_bytes")
            steps = ",".join(sorted(set(r.get("unit_steps") or [])))
            out.append(f"| {name} seed {r['seed']} | {fmt(r['calib_seconds'], 1)} | {fmt(r['quant_top1'])} | "
                       f"{fmt(mem / 2**30 if mem else None)} | {steps} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    path = Path((argv or sys.argv[1:])[0])
    out = ["# The reconstruction step on one GPU", ""]
    for name, what in (("env.txt", "Card and torch"), ("equivalence.txt", "Graph replays against eager steps (tests/test_recon_step.py, CUDA cases)")):
        if path.is_dir() and (path / name).is_file():
            out += [f"{what}: `{(path / name).read_text().strip().splitlines()[-1]}`", ""]
    print("\n".join(out) + "\n" + render(load_runs(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
