"""The upload check's memory estimate (clcalib/memory_estimate.py) against the peak RSS of real
sandboxed calibrations, one JSON row per case on stdout:

    python -m bench.memory_estimate > bench/results/memory_estimate.jsonl

On a GPU machine, ``--device cuda`` runs the same calibrations in the sandbox a CUDA worker uses
(the NVIDIA device files allowed, RLIMIT_DATA at the worker's default 16 GiB): the check that
the sandbox lets CUDA work, which no session has run yet.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from clcalib.graph.registry import build_model, read_state_dict
from clcalib.memory_estimate import activation_bytes, estimate_peak
from jobs.sandbox import Child, ChildFailed, Jail

REF = Path(__file__).resolve().parent.parent.parent / "shared" / "reference"
CASES = [("resnet18", 28, 256, 32), ("resnet18", 112, 128, 32), ("mobilenet_v2", 56, 256, 32)]


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory-gib", type=float, default=16.0, help="the sandbox's RLIMIT_DATA (0: none)")
    args = ap.parse_args()
    for arch, px, n, bs in CASES:
        d = Path(tempfile.mkdtemp())
        for sub in ("in", "out", "res"):
            (d / sub).mkdir()
        weights = d / "in" / "m.safetensors"
        shutil.copy(REF / f"fmnist_{arch}.safetensors", weights)
        x = np.random.default_rng(0).standard_normal((n, 3, px, px)).astype("float32")
        np.save(d / "in" / "calib.npy", x)
        net = build_model(arch, 10, read_state_dict(weights)).eval()
        with torch.no_grad():
            _, largest, total = activation_bytes(net, torch.from_numpy(x[:2]))
        est = estimate_peak(weight_bytes=sum(p.numel() * 4 for p in net.parameters()), image_bytes=3 * px * px * 4,
                            images=n, batch_size=bs, largest_activation=largest, activations=total)
        child = Child("worker.sandboxed:calibrate")
        try:
            report = child.run(Jail(read=[str(d / "in")], write=[str(d / "out"), str(d / "res")], tmp=str(d / "tmp"),
                                memory_bytes=int(args.memory_gib * 2**30), gpu=args.device != "cpu"),
                  {"model": {"arch": arch, "num_classes": 10, "weights": str(weights)},
                   "calibration": str(d / "in" / "calib.npy"), "evaluation": None, "labels": None,
                   "config": {"iters": 3, "calib_size": n, "batch_size": bs, "method": "qdrop", "device": args.device,
                              "preprocess": {"resize": None, "crop": None}},
                   "out_dir": str(d / "out"), "resume_dir": str(d / "res"), "limits": {}, "torch_threads": None},
                  1200)
        except ChildFailed as e:  # a row that says why (on a GPU: what the sandbox refused CUDA)
            report = {"error": f"{e.kind}: {e.message}"}
        print(json.dumps({"arch": arch, "px": px, "images": n, "device": args.device, "sandbox": child.how,
                          "error": report.get("error"), "estimate_gib": round(est["total"] / 2**30, 2),
                          "peak_gib": round(child.peak_rss_bytes / 2**30, 2),
                          "parts_gib": {k: round(v / 2**30, 2) for k, v in est.items()}}), flush=True)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
