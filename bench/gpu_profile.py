"""Where the reconstruction loop's time goes on a device: resnet18 qdrop W4A4 under
torch.profiler (the ops with most host time and most device time), and the loop's iterations
per second with exact numerics (FP32, deterministic cuDNN: what ``calibrate`` runs with), with
the steps eager and replayed from a CUDA graph (``step_capture`` off / auto), with the fraction
of that time the GPU was busy (nvidia-smi's utilization, sampled every 100 ms), and with
``--tf32`` without exact numerics. On an H200 the eager loop ran at 170-230 iterations/s,
bound by the host (RESULTS.md). ``--out`` appends one JSON row per (model, steps).

    python -m bench.gpu_profile --device cuda --data-dir .gpu --reference-dir .gpu [--tf32] [--out rates.jsonl]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import clcalib.calibration as calibration
from bench.accuracy import WORK, prepare_data
from clcalib.config import CalibConfig
from clcalib.data import load_calibration
from clcalib.graph.registry import build_model, read_state_dict
from clcalib.testing import PREPROCESS, REFERENCE


def loop_rate(model, calib, cfg: CalibConfig) -> float:
    """Reconstruction iterations per second over all units, start-up and evaluation excluded
    (progress events come after a host sync, so their times are the device's)."""
    marks: dict[int, list[tuple[float, int]]] = {}

    def on(e):
        if e.stage == "reconstruct":
            marks.setdefault(e.unit, []).append((time.perf_counter(), e.iteration))

    calibration.calibrate(model, calib, cfg, on)
    its = sum(m[-1][1] - m[0][1] for m in marks.values())
    secs = sum(m[-1][0] - m[0][0] for m in marks.values())
    return its / secs


class GpuBusy:
    """Mean of nvidia-smi's utilization.gpu (percent of time a kernel was running) while open;
    None without nvidia-smi."""

    def __enter__(self):
        exe = shutil.which("nvidia-smi")
        self.proc = subprocess.Popen([exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                                     stdout=subprocess.PIPE, text=True) if exe else None
        return self

    def __exit__(self, *exc):
        self.percent = None
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            vals = [float(v) for v in out.split() if v.strip().replace(".", "", 1).isdigit()]
            self.percent = sum(vals) / len(vals) if vals else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--iters", type=int, default=400, help="iterations per unit for the rate")
    p.add_argument("--profile-iters", type=int, default=40, help="iterations per unit under the profiler")
    p.add_argument("--tf32", action="store_true", help="also measure without exact numerics")
    p.add_argument("--models", default="resnet18", help="models whose rates are measured (eager and graph)")
    p.add_argument("--no-profile", action="store_true", help="only the rates")
    p.add_argument("--out", type=Path, default=None, help="append a JSON row per rate here")
    p.add_argument("--data-dir", type=Path, default=WORK)
    p.add_argument("--reference-dir", type=Path, default=REFERENCE)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    calib_zip, _ = prepare_data(a.data_dir)
    base = {"method": "qdrop", "w_bits": 4, "a_bits": 4, "seed": 0, "device": a.device, "preprocess": PREPROCESS}
    calib = load_calibration(calib_zip, CalibConfig.model_validate(base).preprocess, 1024, 0)
    model = build_model("resnet18", 10, read_state_dict(a.reference_dir / "fmnist_resnet18.safetensors"))
    cuda = a.device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else "cpu"

    if not a.no_profile:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            calibration.calibrate(model, calib, CalibConfig.model_validate({**base, "iters": a.profile_iters}))
        for key in ["self_cpu_time_total"] + (["self_cuda_time_total"] if cuda else []):
            print(f"\n== {name}: top ops by {key} ({a.profile_iters} iterations per unit, start-up included)")
            print(prof.key_averages().table(sort_by=key, row_limit=15))

    for arch in a.models.split(","):
        net = build_model(arch, 10, read_state_dict(a.reference_dir / f"fmnist_{arch}.safetensors"))
        for steps in ("off", "auto"):
            cfg = CalibConfig.model_validate({**base, "iters": a.iters, "step_capture": steps})
            with GpuBusy() as busy:
                rate = loop_rate(net, calib, cfg)
            row = {"model": arch, "device": name, "iters_per_unit": a.iters, "step_capture": steps,
                   "iters_per_s": round(rate, 1), "gpu_busy_percent": busy.percent, "torch": torch.__version__}
            print(json.dumps(row), flush=True)
            if a.out:
                with a.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    if a.tf32:
        cfg = CalibConfig.model_validate({**base, "iters": a.iters})
        # calibrate() always runs under exact_numerics; swap it out to see what it costs
        exact = calibration.exact_numerics
        calibration.exact_numerics = contextlib.nullcontext
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.benchmark = True
        try:
            print(f"{name}: {loop_rate(model, calib, cfg):.1f} iterations/s with TF32 and cuDNN autotuning", flush=True)
        finally:
            calibration.exact_numerics = exact


if __name__ == "__main__":
    main()
