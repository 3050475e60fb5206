"""CPU time of resnet18 qdrop W2A4 per iteration (all units), one torch thread: a run at 0
and at 200 iterations; the difference gives the per-iteration cost, the rest is start-up.
Run it with nothing else on the cores:

    python -m bench.cpu_timing > bench/results/cpu_timing_uncontended.json
"""

from __future__ import annotations

import json
import time


def main() -> None:
    import torch

    from bench.accuracy import prepare_data
    from clcalib import calibrate
    from clcalib.config import Preprocess
    from clcalib.data import load_calibration
    from clcalib.graph.registry import build_model, read_state_dict
    from clcalib.testing import PREPROCESS, REFERENCE

    torch.set_num_threads(1)
    cal = load_calibration(prepare_data()[0], Preprocess(**PREPROCESS), 1024)
    model = build_model("resnet18", 10, read_state_dict(REFERENCE / "fmnist_resnet18.safetensors"))
    seconds = {}
    for iters in (0, 200):
        t = time.perf_counter()
        calibrate(model, cal, {"method": "qdrop", "w_bits": 2, "a_bits": 4, "iters": iters, "device": "cpu",
                               "preprocess": PREPROCESS})
        seconds[iters] = time.perf_counter() - t
    per_iter = (seconds[200] - seconds[0]) / 200
    print(json.dumps({"seconds_iters0": round(seconds[0], 1), "seconds_iters200": round(seconds[200], 1),
                      "per_iteration_all_units_s": round(per_iter, 4),
                      "extrapolated_2000_s": round(seconds[0] + 2000 * per_iter, 1),
                      "extrapolated_20000_s": round(seconds[0] + 20000 * per_iter, 1)}))


if __name__ == "__main__":
    main()
