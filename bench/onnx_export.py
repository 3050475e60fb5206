"""ONNX export benchmark of the exact ``reference`` layout (the integer targets' speed:
bench/export_speed.py): for each reference model and bit setting, calibrate (qdrop, short
schedule) through the same pipeline as the CLI with ``export: ["onnx"]``, then hold ONNX Runtime
against the reloaded torch checkpoint on the 10k test images; at W8A8 also time the QDQ file
against the FP32 ONNX export of the same model in ONNX Runtime (same run, interleaved).

One JSON row per finished run is appended to --out; runs already there are skipped.

    python -m bench.onnx_export --out bench/results/onnx_export.jsonl
    python -m bench.onnx_export --table bench/results/onnx_export.jsonl > bench/RESULTS_onnx.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench.accuracy import prepare_data
from clcalib.testing import PREPROCESS, REFERENCE


def latency_ms(path: Path, batch: int, shape: tuple[int, ...], threads: int, repeats: int,
               config: dict | None = None) -> list[float]:
    import numpy as np

    from clcalib.export.onnx_check import session

    s = session(path, threads, config)
    x = np.random.default_rng(0).standard_normal((batch, *shape[1:])).astype(np.float32)
    for _ in range(5):
        s.run(None, {"input": x})
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        s.run(None, {"input": x})
        out.append((time.perf_counter() - t) * 1e3)
    return out


def timing(fp_onnx: Path, q_onnx: Path, shape, threads: int, repeats: int = 60) -> dict:
    """Median ms per batch: the FP32 file, the QDQ file as ONNX Runtime runs it by default
    (integer kernels where its QDQ fusion applies), and the QDQ file with that fusion off
    (``session.disable_quant_qdq``: weights dequantized once, float kernels); interleaved in
    rounds so drift hits all alike."""
    import statistics

    from clcalib.export.onnx_check import UNFUSED

    variants = {"fp32": (fp_onnx, None), "qdq": (q_onnx, None),
                "qdq_float_kernels": (q_onnx, UNFUSED)}
    res: dict = {}
    for batch in (1, 32):
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(3):
            for k, (path, config) in variants.items():
                times[k] += latency_ms(path, batch, shape, threads, repeats // 3, config)
        med = {k: statistics.median(v) for k, v in times.items()}
        res[f"b{batch}"] = {**{f"{k}_ms": v for k, v in med.items()},
                            **{f"{k}_over_fp32": med[k] / med["fp32"] for k in variants if k != "fp32"}}
    return res


def ort_node_counts(path: Path, threads: int) -> dict:
    """Which ops ONNX Runtime runs after its graph optimisations (QLinearConv = integer conv)."""
    import collections

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return dict(collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node))


def run_one(model: str, bits: str, iters: int, calib: Path, test: Path, threads: int, w_symmetric: bool,
            placement: str) -> dict:
    import torch

    from clcalib.config import CalibConfig
    from clcalib.export.onnx_qdq import export_onnx
    from clcalib.graph.partition import QuantModel, QuantSpec
    from clcalib.graph.registry import build_model, read_state_dict
    from clcalib.pipeline import ONNX_NAME, run_calibration

    torch.set_num_threads(threads)
    cfg = CalibConfig.model_validate({"method": "qdrop", "w_bits": int(bits[1]), "a_bits": int(bits[3]), "iters": iters,
                                      "seed": 0, "device": "cpu", "calib_size": 1024, "preprocess": PREPROCESS,
                                      "export": ["onnx"], "export_target": "reference", "w_symmetric": w_symmetric,
                                      "act_placement": placement})
    weights = REFERENCE / f"fmnist_{model}.safetensors"
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        t0 = time.perf_counter()
        report = run_calibration(arch=model, num_classes=10, weights=weights, calibration=calib, config=cfg,
                                 out_dir=out, evaluation=test)
        m = report["metrics"]
        fp = QuantModel(build_model(model, 10, read_state_dict(weights)), QuantSpec.from_config(cfg),
                        torch.zeros(1, 3, 28, 28))
        fp_bytes = export_onnx(fp, out / "fp32.onnx", (1, 3, 28, 28), quantized=False)
        row = {"model": model, "bits": bits, "w_symmetric": w_symmetric, "act_placement": placement, "method": "qdrop", "iters": iters, "seed": 0,
               "threads": threads,
               "fp_top1": m["fp_top1"], "torch_top1": m["quant_top1"], "onnx_top1": m["onnx_top1"],
               "onnx_top1_agreement": m["onnx_top1_agreement"], "onnx_max_abs_logit_diff": m["onnx_max_abs_logit_diff"],
               "eval_images": m["eval_images"], "onnx_bytes": m["onnx_bytes"], "fp32_onnx_bytes": fp_bytes,
               "checkpoint_bytes": (out / "quantized.safetensors").stat().st_size,
               "calib_seconds": round(m["calibration_seconds"], 1), "wall_seconds": round(time.perf_counter() - t0, 1)}
        if bits == "W8A8":
            row["latency"] = timing(out / "fp32.onnx", out / ONNX_NAME, (1, 3, 28, 28), threads)
            row["ort_ops_qdq"] = ort_node_counts(out / ONNX_NAME, threads)
    return row


def _variant(r: dict) -> str:
    parts = (["sym. weights"] if r.get("w_symmetric") else []) + (
        ["every_layer"] if r.get("act_placement", "block") != "block" else [])
    return f" ({', '.join(parts)})" if parts else ""


def table(rows: list[dict]) -> str:
    """Markdown tables of the rows: fidelity for every run, latency for the W8A8 ones."""
    out = ["# ONNX export: ONNX Runtime against the torch checkpoint",
           "",
           "Generated by `python -m bench.onnx_export --table bench/results/onnx_export.jsonl`; the rows' commands: "
           + "; ".join(f"`{c}`" for c in dict.fromkeys(r["cmd"] for r in rows)) + f" (qdrop, {rows[0]['iters']} it/unit, 1024 calibration images, seed 0; ONNX Runtime "
           f"{rows[0]['onnxruntime']}, torch {rows[0]['torch']}, {rows[0]['threads']} threads). Top-1 on the 10k "
           "Fashion-MNIST test images; agreement = same top-1 class as the reloaded torch checkpoint.",
           "",
           "| model | bits | FP top-1 | torch top-1 | ONNX Runtime top-1 | agreement % | max abs logit diff "
           "| .onnx MB | FP32 .onnx MB | ratio |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['bits']}{_variant(r)} | {r['fp_top1']:.2f} | {r['torch_top1']:.2f} | {r['onnx_top1']:.2f} | "
                   f"{r['onnx_top1_agreement']:.2f} | {r['onnx_max_abs_logit_diff']:.3f} | {r['onnx_bytes'] / 1e6:.2f} | "
                   f"{r['fp32_onnx_bytes'] / 1e6:.2f} | {r['fp32_onnx_bytes'] / r['onnx_bytes']:.1f}x |")
    out += ["", "## W8A8 latency in ONNX Runtime (median ms per batch, interleaved in one run)", "",
            "`qdq`: the exported file as ONNX Runtime runs it by default (integer QLinearConv where it fuses); "
            "`qdq, float kernels`: the same file with `session.disable_quant_qdq=1`. Ops after ORT's optimisation in "
            "the last column.", "",
            "| model | batch | FP32 ms | qdq ms (x FP32) | qdq, float kernels ms (x FP32) | ORT ops of the qdq file |",
            "|---|---|---|---|---|---|"]
    for r in rows:
        for b, lat in (r.get("latency") or {}).items():
            ops = ", ".join(f"{k} {v}" for k, v in sorted(r["ort_ops_qdq"].items()) if k in ("QLinearConv", "QLinearAdd", "Conv", "FusedConv", "DequantizeLinear", "Transpose"))
            out.append(f"| {r['model']}{_variant(r)} | {b[1:]} | {lat['fp32_ms']:.2f} | {lat['qdq_ms']:.2f} ({lat['qdq_over_fp32']:.1f}x) | "
                       f"{lat['qdq_float_kernels_ms']:.2f} ({lat['qdq_float_kernels_over_fp32']:.1f}x) | {ops} |")
    return "\n".join(out + ["", NOTES]) + "\n"


NOTES = """## Reading these tables

- Goal of issue 12: agreement >= 99.9 % and top-1 within 0.05 points at every setting. Top-1
  is within 0.03 points everywhere; agreement is 99.93-100 % except resnet18 W4A2 (99.86 %):
  with 2-bit activations a float-order difference at one rounding boundary moves a value by a
  whole step and it cascades (docs/deploy.md; the export fails below 97 %).
- mobilenet_v2 W4A2 at 23 % is qdrop at 200 iterations per unit, not the export: this net needs
  >= 2000 (bench/RESULTS.md); the ONNX file reproduces the torch model exactly as badly.
- The .onnx holds 2- and 3-bit weights in INT4 (opset 21 has no smaller type), so W2 and W4 files
  are the same size; the safetensors checkpoint packs 2 bits (docs/checkpoint.md).
- Latency: one shared 2-core VM; the three files of a row are interleaved in rounds, so their
  ratios hold, but absolute times vary between rows (some rows ran while tests ran on the other
  core). Only the every_layer + symmetric-weight file runs (almost) all convs and adds as
  integer kernels; it is faster than FP32 for mobilenet_v2 at batch 1 and 32 and for resnet18
  at batch 32, not for resnet18 at batch 1 (0.91 vs 0.76 ms: the float first conv, six layout
  transposes and per-op overhead on 28x28 inputs).
- These rows are from the export's INT8 layout for 8-bit weights; it now writes UINT8 (exact on
  x86 CPUs without VNNI, see docs/deploy.md), which on a VNNI CPU made the every_layer +
  symmetric-weight files 1.3-1.4x slower and the default-placement W8A8 ones 1.05x (batch 64)."""


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(table([json.loads(line) for line in Path(sys.argv[2]).read_text().splitlines()]), end="")
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenet_v2")
    p.add_argument("--bits", default="W8A8,W4A4,W2A4,W4A2")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    p.add_argument("--w-symmetric", action="store_true", help="symmetric weights (zero point 0, what INT8 engines want)")
    p.add_argument("--placement", choices=["block", "every_layer"], default="block", help="config act_placement")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import platform

    import onnxruntime
    import torch

    out = Path(a.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["bits"], r["iters"], r.get("w_symmetric", False), r.get("act_placement", "block")))
    calib, test = prepare_data()
    cmd = "python -m bench.onnx_export " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    for model in a.models.split(","):
        for bits in a.bits.split(","):
            if (model, bits, a.iters, a.w_symmetric, a.placement) in done:
                continue
            row = run_one(model, bits, a.iters, calib, test, a.threads, a.w_symmetric, a.placement)
            row.update({"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "cmd": cmd})
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in ("model", "bits", "torch_top1", "onnx_top1", "onnx_top1_agreement")}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
