"""CPU time of resnet18 qdrop W2A4 per iteration (all units), one torch thread: a run at 0
and at 200 iterations; the difference gives the per-iteration cost, the rest is start-up.
Run it with nothing else on the cores:  python -m bench.cpu_timing"""
import json
import time

import torch

torch.set_num_threads(1)
from bench.accuracy import prepare_data
from bench.fmnist import PREPROCESS, REFERENCE
from clcalib import calibrate
from clcalib.config import Preprocess
from clcalib.data import load_calibration
from clcalib.graph.registry import build_model, read_state_dict

cal = load_calibration(prepare_data()[0], Preprocess(**PREPROCESS), 1024)
m = build_model('resnet18', 10, read_state_dict(REFERENCE / 'fmnist_resnet18.safetensors'))
res = {}
for iters in (0, 200):
    t = time.perf_counter()
    r = calibrate(m, cal, {"method": "qdrop", "w_bits": 2, "a_bits": 4, "iters": iters, "device": "cpu", "preprocess": PREPROCESS})
    res[iters] = time.perf_counter() - t
per_iter = (res[200] - res[0]) / 200
print(json.dumps({"seconds_iters0": round(res[0], 1), "seconds_iters200": round(res[200], 1),
                  "per_iteration_all_units_s": round(per_iter, 4),
                  "extrapolated_2000_s": round(res[0] + 2000 * per_iter, 1),
                  "extrapolated_20000_s": round(res[0] + 20000 * per_iter, 1)}))
