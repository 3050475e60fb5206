"""clcalib on the reference resnet18 beside AIMET's AMP (bench/peer_aimet_amp.py): the same 1024
calibration images, 10k test images and size accounting. One row per run appended to
bench/results/cpu_mixed_side_by_side.jsonl.

    PYTHONPATH=. python bench/mixed_side_by_side.py mse W3A8 0 4.241882    # budget: uniform W3's size
    PYTHONPATH=. python bench/mixed_side_by_side.py mse W3A8 0 none        # uniform W3
    PYTHONPATH=. python bench/mixed_side_by_side.py mse W3A8 0 target1.0   # accuracy target 1.0 point
"""
import json
import platform
import sys
import time
from pathlib import Path

import torch

from clcalib.config import CalibConfig
from clcalib.pipeline import run_calibration
from clcalib.testing import PREPROCESS, REFERENCE

HERE = Path(__file__).resolve().parent
method, bits, iters, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
w, a = int(bits[1]), int(bits[3])
cfg = {"method": method, "w_bits": w, "a_bits": a, "iters": iters, "seed": 0, "device": "cpu", "calib_size": 1024,
       "preprocess": PREPROCESS}
if budget.startswith("target"):
    cfg["target"] = {"max_top1_drop": float(budget[6:])}
elif budget != "none":
    cfg["budget"] = {"weight_mb": float(budget)}
name = f"{method}_{bits}_{iters}_{budget}"
out = HERE / "work" / "side_by_side" / name
t = time.perf_counter()
rep = run_calibration(arch="resnet18", num_classes=10, weights=REFERENCE / "fmnist_resnet18.safetensors",
                      calibration=HERE / "work" / "fmnist_train_1024.zip", evaluation=HERE / "work" / "fmnist_test_10k.zip",
                      config=CalibConfig.model_validate(cfg), out_dir=out)
m = rep["metrics"]
mp = rep.get("mixed_precision") or {}
row = {"tool": "clcalib", "method": method, "bits": bits, "iters": iters, "budget_weight_mb": budget,
       "fp_top1": m["fp_top1"], "quant_top1": m["quant_top1"], "weight_bytes": m.get("weight_bytes"),
       "w_bits_avg": (mp.get("allocation") or {}).get("w_bits_avg"), "layer_bits": (mp.get("allocation") or {}).get("layer_bits"),
       "search": mp.get("search"), "calib_seconds": m["calibration_seconds"], "sensitivity_seconds": mp.get("sensitivity_seconds"),
       "wall_seconds": time.perf_counter() - t, "torch": torch.__version__, "python": platform.python_version()}
with open(HERE / "results" / "cpu_mixed_side_by_side.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
print(json.dumps(row))
