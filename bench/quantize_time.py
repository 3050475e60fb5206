"""Range-only calibration time against NNCF's, same images, one process, alternating rounds.

    python -m bench.quantize_time --out bench/results/quantize_time_224.jsonl

clcalib's ``calibrate`` (minmax, W8A8, symmetric weights, the report's progress off) and
``nncf.quantize`` (defaults) on the FP32 ONNX export, the reference models at 224 px (the
Fashion-MNIST images upscaled), 64 calibration images, 1 torch thread; each round runs both, so
the ratio holds under a shared machine's load. One JSON row per round, appended as it finishes.
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import clcalib as lib
from bench.export_speed import PREPROCESS, _images, nncf_file
from clcalib.export.onnx_qdq import export_onnx
from clcalib.graph.registry import build_model, read_state_dict
from clcalib.testing import REFERENCE, calibration_indices


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenet_v2")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--calib-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    calib, _ = _images("train", calibration_indices(a.calib_size), a.size)
    for model in a.models.split(","):
        run_model(model, calib, a)
    return 0


def run_model(model: str, calib, a) -> None:
    fp = build_model(model, 10, read_state_dict(REFERENCE / f"fmnist_{model}.safetensors"))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for rnd in range(a.rounds):
            t = time.perf_counter()
            res = lib.calibrate(fp, calib, {"method": "minmax", "w_bits": 8, "a_bits": 8, "iters": 0, "w_symmetric": True,
                                      "device": "cpu", "calib_size": a.calib_size, "preprocess": PREPROCESS}, on_progress=lambda e: None)
            ours = time.perf_counter() - t
            if rnd == 0:
                export_onnx(res.model, d / "fp32.onnx", (1, 3, a.size, a.size), quantized=False)
            theirs = nncf_file(d / "fp32.onnx", calib, d / "nncf.onnx")
            row = {"model": model, "size": a.size, "calib_images": a.calib_size, "round": rnd,
                   "clcalib_minmax_s": round(ours, 2), "nncf_s": round(theirs, 2), "ratio": round(ours / theirs, 2),
                   "torch": torch.__version__, "load_1min": round(os.getloadavg()[0], 2)}
            print(json.dumps(row), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
