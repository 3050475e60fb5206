"""Accuracy benchmark on real Fashion-MNIST with the reference models.

Every run goes through the same path as the CLI and the service (calibrate -> checkpoint ->
reload -> evaluate on the 10k test images); one JSON row per finished run is appended to
--out, and runs already there are skipped, so a cut session keeps what completed.

    python -m bench.accuracy --iters 200 --jobs 2 --out bench/results/cpu.jsonl
    python -m bench.summarize bench/results/cpu.jsonl > bench/results/cpu.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from bench.summarize import settings
from clcalib.testing import PREPROCESS, REFERENCE, calibration_indices, write_zip

WORK = Path(__file__).resolve().parent / "work"
MODELS = Path(__file__).resolve().parent / "models"  # models trained here (bench/train_vit.py), as .pt2 programs


SUPPLY = 1024  # train images a run is handed unless --supply says otherwise; calib_size of them are used


def supplied(row: dict) -> int:
    """How many train images the run was handed (rows made before --supply: 1024)."""
    return row.get("calib_supplied", SUPPLY)


def prepare_data(work: Path = WORK, calib_n: int = SUPPLY) -> tuple[Path, Path]:
    """``calib_n`` train images (fixed random choice, seed 0: a larger supply contains a smaller
    one) and the 10k test images, as PNG zips
    (made once; a machine without the dataset package can be handed the zips in ``work``)."""
    calib = work / f"fmnist_train_{calib_n}.zip"
    test = work / "fmnist_test_10k.zip"
    if not calib.exists():
        write_zip(calib, "train", calibration_indices(calib_n, seed=0), by_class=False)
    if not test.exists():
        write_zip(test, "t10k", range(10000), by_class=True)
    return calib, test


def requested_config(spec: dict) -> dict:
    """The config a run asks for: the table's fields, then its overrides (and CL-Calib on)."""
    w, a = spec["bits"][1], spec["bits"][3]
    cfg = {"method": spec["method"], "w_bits": int(w), "a_bits": int(a), "iters": spec["iters"], "seed": spec["seed"],
           "device": spec["device"], "calib_size": 1024, "preprocess": PREPROCESS, **spec.get("overrides", {})}
    if spec.get("cl"):
        cfg["cl_calib"] = {**cfg.get("cl_calib", {}), "enabled": True}
    return cfg


def resolved_config(spec: dict) -> dict:
    """What the run will record as its config (defaults filled in), without running it; what it
    asked for where that is not a valid config (the run then fails and leaves an error row)."""
    from pydantic import ValidationError

    from clcalib.config import CalibConfig

    cfg = requested_config(spec)
    try:
        return CalibConfig.model_validate(cfg).model_dump(mode="json", by_alias=True)
    except ValidationError:
        return cfg


def run_key(row: dict) -> tuple:
    """Identity of a run for skipping what is done: by the settings it ran with, not by what it
    asked for, so a row made under an older default does not stand in for today's default."""
    cfg = row.get("config") or {}
    calib_size = cfg.get("calib_size", row.get("overrides", {}).get("calib_size", 1024))  # not in settings(): tables show it
    return (row["model"], row["bits"], row["method"], bool(row.get("cl", False)), row["seed"], row["iters"],
            row.get("device", "cpu"), calib_size, supplied(row), json.dumps(settings(row), sort_keys=True))


def run_dir(spec: dict) -> Path:
    """One folder per run key, overrides included: two variants of one setting running at the
    same time must not share a checkpoint (each reloads its own for evaluation) or resume state."""
    name = "_".join(str(spec[k]) for k in ("model", "bits", "method")) + f"_{bool(spec.get('cl', False))}_{spec['seed']}_{spec['iters']}"
    if supplied(spec) != SUPPLY:
        name += f"_of{supplied(spec)}"
    if spec.get("overrides"):
        name += "_" + hashlib.sha256(json.dumps(spec["overrides"], sort_keys=True).encode()).hexdigest()[:10]
    return WORK / "runs" / name


def to_do(wanted: list[dict], rows: list[dict]) -> list[dict]:
    """The runs of ``wanted`` that no finished row covers (a failed run is tried again), each
    once even where two variants resolve to the same settings."""
    done = {run_key(r) for r in rows if "error" not in r}
    out = []
    for s in wanted:
        key = run_key({**s, "config": resolved_config(s)})
        if key not in done:
            done.add(key)
            out.append(s)
    return out


def code_version() -> str | None:
    """The commit the run's code came from, "+dirty" when the checkout had changes: rows of one
    table may span code changes, and this says which."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "clcalib", "bench/*.py"], cwd=here.parent,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name: the same machine kind has come with different CPUs, and times
    (even the last digits of accuracies) are comparable only on one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_one(spec: dict) -> dict:
    import torch

    from clcalib.config import CalibConfig
    from clcalib.pipeline import run_calibration

    torch.set_num_threads(spec["threads"])
    cfg = requested_config(spec)
    out = run_dir(spec)
    t = time.perf_counter()
    program = MODELS / f"fmnist_{spec['model']}.pt2"
    model = {"model": program} if program.is_file() else {
        "arch": spec["model"], "num_classes": 10, "weights": Path(spec["reference"]) / f"fmnist_{spec['model']}.safetensors"}
    report = run_calibration(**model, calibration=spec["calib"], evaluation=spec["test"], config=CalibConfig.model_validate(cfg),
                             out_dir=out, resume_dir=out / "resume")  # a restarted benchmark resumes mid-run
    # done: a later run of the same spec (another file, a re-measurement) must calibrate afresh,
    # not resume from this one's finished state and report its seconds as 1
    shutil.rmtree(out / "resume", ignore_errors=True)
    m = report["metrics"]
    return {**{k: spec[k] for k in ("model", "bits", "method", "seed", "iters", "device", "threads")},
            "cl": bool(spec.get("cl")), "overrides": spec.get("overrides", {}), "calib_supplied": supplied(spec),
            "fp_top1": m["fp_top1"], "quant_top1": m["quant_top1"], "top1_agreement": m["top1_agreement"],
            "sqnr_db": m["sqnr_db"], "calib_seconds": round(m["calibration_seconds"], 1),
            "resumed_units": m.get("resumed_units", 0),  # > 0: calib_seconds covers only the rest
            "wall_seconds": round(time.perf_counter() - t, 1),
            "unit_loss_after": [round(u["loss_after"], 5) for u in report["units"]],
            "unit_seconds": [round(u["seconds"], 1) for u in report["units"]],  # where a long run's time went
            "phase_seconds": m.get("phase_seconds"),  # and in which phase (clcalib.recon.phases)
            "unit_steps": [u.get("steps") for u in report["units"]],  # graph / eager (the CUDA-graph step)
            "unit_caches": [u.get("caches") for u in report["units"]],  # device / host memory
            "peak_device_memory_bytes": m.get("peak_device_memory_bytes"),
            "gpu": torch.cuda.get_device_name() if spec["device"].startswith("cuda") else None,
            "weight_bytes": m.get("weight_bytes"),
            "mixed_precision": _mixed_summary(report.get("mixed_precision")),
            "config": report["config"],  # resolved: a row stays readable after a default changes
            "host": socket.gethostname(), "cpu": cpu_model(), "commit": spec.get("commit"), "torch": report["versions"]["torch"], "python": platform.python_version()}


def _mixed_summary(mixed: dict | None) -> dict | None:
    """What a table needs of a mixed-precision run: its size, its bits, its search."""
    if not mixed:
        return None
    keep = {k: mixed[k] for k in ("allocation", "uniform", "sensitivity_seconds", "proxy_check", "search")
            if k in mixed}
    return keep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenet_v2")
    p.add_argument("--bits", default="W4A4,W2A4,W4A2,W2A2")
    p.add_argument("--methods", default="qdrop,brecq,adaround,mse,minmax")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--seeded-methods", default="qdrop,brecq,pdquant", help="methods run at every seed; others at the first")
    p.add_argument("--cl", default="off", choices=["off", "on", "both"], help="CL-Calib on top of the method")
    p.add_argument("--overrides", default="{}",
                   help="JSON object merged into every run's config, or a JSON list of them: one variant each (ablations)")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", type=Path, default=WORK, help="where the PNG zips are (made if missing)")
    p.add_argument("--reference-dir", type=Path, default=REFERENCE, help="where fmnist_<arch>.safetensors are")
    p.add_argument("--supply", type=int, default=SUPPLY,
                   help="train images handed to each run (calib_size of them used, calib_seed says which)")
    p.add_argument("--deadline", type=float, default=None, help="seconds after which no new run starts")
    a = p.parse_args(argv)

    calib, test = prepare_data(a.data_dir, a.supply)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    commit = code_version()  # of the code the workers import now, not when they finish
    seeds = [int(s) for s in a.seeds.split(",")]
    seeded = set(a.seeded_methods.split(","))
    cl_modes = {"off": [False], "on": [True], "both": [False, True]}[a.cl]
    variants = json.loads(a.overrides)
    variants = variants if isinstance(variants, list) else [variants]
    wanted = [{"model": model, "bits": bits, "method": method, "seed": seed, "iters": a.iters, "cl": cl,
               "device": a.device, "threads": a.threads, "overrides": ov, "commit": commit, "calib_supplied": a.supply,
               "calib": str(calib), "test": str(test), "reference": str(a.reference_dir)}
              for model in a.models.split(",") for method in a.methods.split(",") for bits in a.bits.split(",")
              for seed in (seeds if method in seeded else seeds[:1]) for cl in cl_modes for ov in variants]
    specs = to_do(wanted, rows)
    print(f"{len(specs)} runs to do ({len(rows)} rows already in {out})", file=sys.stderr, flush=True)
    cmd = "python -m bench.accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.monotonic()
    ctx = multiprocessing.get_context("spawn")  # no CUDA state inherited through fork
    with ProcessPoolExecutor(a.jobs, mp_context=ctx) as pool:
        futs = {pool.submit(run_one, s): s for s in specs}
        for f in as_completed(futs):
            if a.deadline is not None and time.monotonic() - t0 > a.deadline:
                for other in futs:
                    other.cancel()  # runs not started yet stay undone; they show up as missing
            s = futs[f]
            if f.cancelled():
                continue
            try:
                row = {**f.result(), "cmd": cmd, "cpu_count": os.cpu_count()}
            except Exception as e:  # a failed run is a row too, so it is visible in the table
                row = {**{k: s[k] for k in ("model", "bits", "method", "seed", "iters", "device", "cl", "overrides", "calib_supplied")},
                       "config": resolved_config(s), "error": f"{type(e).__name__}: {e}", "cmd": cmd,
                       "traceback": traceback.format_exc(limit=-6)}  # where it broke, from a device run's log alone
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps({k: row.get(k) for k in ("model", "bits", "method", "cl", "seed", "quant_top1", "calib_seconds", "error")}),
                  file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
