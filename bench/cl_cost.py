"""What CL-Calib costs on top of qdrop, measured in one process on one thread: CPU seconds
(process time, so other processes on the cores do not enter) of the reconstruction loop per
iteration, summed over the units (from the progress events), and of the whole calibration.

    python -m bench.cl_cost --iters 40 --variants '{}' '{"every": 4}'
    python -m bench.cl_cost --arch mobilenet_v2 --bits W4A2 --calib-size 128 --iters 40

Each variant is a ``cl_calib`` block on top of the shipped form (``{}``: the default)."""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--bits", default="W2A4")
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "mobilenet_v2"])
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--variants", nargs="*", default=["{}"], help="cl_calib blocks (JSON), each a CL run beside qdrop")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from bench.accuracy import prepare_data
    from clcalib import calibrate
    from clcalib.config import Preprocess
    from clcalib.data import load_calibration
    from clcalib.graph.registry import build_model, read_state_dict
    from clcalib.testing import PREPROCESS, REFERENCE

    variants = {"qdrop": None, **{f"qdrop+CL {v}": json.loads(v) for v in a.variants}}
    data = load_calibration(prepare_data()[0], Preprocess(**PREPROCESS), a.calib_size, 0)
    model = build_model(a.arch, 10, read_state_dict(REFERENCE / f"fmnist_{a.arch}.safetensors"))
    base = {"method": "qdrop", "w_bits": int(a.bits[1]), "a_bits": int(a.bits[3]), "iters": a.iters, "device": "cpu",
            "calib_size": a.calib_size}
    got = {k: {"loop_s_per_it": [], "calib_cpu_s": []} for k in variants}
    for _ in range(a.repeats):
        for name, cl in variants.items():  # interleaved: a change of load hits every variant alike
            events: dict[int, list] = {}

            def on(e, events=events):
                if e.stage == "reconstruct":
                    events.setdefault(e.unit, []).append((e.iteration, time.process_time()))

            cfg = {**base, **({"cl_calib": {"enabled": True, **cl}} if cl is not None else {})}
            t0 = time.process_time()
            calibrate(model, data, cfg, on_progress=on)
            got[name]["calib_cpu_s"].append(time.process_time() - t0)
            # each unit's loop between its first and last progress event, per iteration
            got[name]["loop_s_per_it"].append(sum((v[-1][1] - v[0][1]) / (v[-1][0] - v[0][0]) for v in events.values()))
    q = got["qdrop"]
    for name, v in got.items():
        print(json.dumps({"variant": name, "arch": a.arch, "bits": a.bits, "calib_size": a.calib_size, "iters": a.iters, "repeats": a.repeats,
                          "loop_ratio": round(sum(v["loop_s_per_it"]) / sum(q["loop_s_per_it"]), 3),
                          "calib_ratio": round(sum(v["calib_cpu_s"]) / sum(q["calib_cpu_s"]), 3),
                          **{k: [round(x, 4) for x in xs] for k, xs in v.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
