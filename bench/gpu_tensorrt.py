"""The tensorrt export target in TensorRT: calibrate a reference model (W8A8 and W4A8, symmetric
weights), export it for ``--target tensorrt``, check it in ONNX Runtime (on any machine), then,
where TensorRT and a CUDA device are present, build an INT8 engine from the file and an FP16
engine from the FP32 export and compare their top-1 and latency (median of interleaved runs).
Without a GPU the TensorRT stage is skipped and says so; each row is appended to --out as it
finishes.

    python -m bench.gpu_tensorrt --out bench/results/gpu_tensorrt.jsonl          # GPU machine (pip install tensorrt)
    python -m bench.gpu_tensorrt --out /tmp/trt.jsonl --iters 0 --eval-size 200   # CPU: the ONNX part only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.export_speed import _images
from clcalib.testing import PREPROCESS, REFERENCE


def _engine(path: Path, int8: bool, max_batch: int):
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(path.read_bytes()):
        raise RuntimeError(f"{path}: TensorRT cannot parse it: {parser.get_error(0)}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: the file's Q/DQ decide the scales
    profile = builder.create_optimization_profile()
    shape = tuple(network.get_input(0).shape)[1:]
    profile.set_shape(network.get_input(0).name, (1, *shape), (max_batch, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{path}: TensorRT could not build an engine")
    return trt.Runtime(logger).deserialize_cuda_engine(serialized)


def _runner(engine):
    """A function of a CUDA tensor batch -> logits (CUDA), on torch's current stream."""
    import torch

    ctx = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp, out = names[0], names[-1]

    def run(x):
        ctx.set_input_shape(inp, tuple(x.shape))
        y = torch.empty(tuple(ctx.get_tensor_shape(out)), device=x.device, dtype=torch.float32)
        ctx.set_tensor_address(inp, x.data_ptr())
        ctx.set_tensor_address(out, y.data_ptr())
        ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return y

    return run


def _median_ms(runs: dict, x, rounds: int = 5, per: int = 20) -> dict:
    import torch

    times: dict = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            for _ in range(3):
                run(x)
            torch.cuda.synchronize()
            for _ in range(per):
                t = time.perf_counter()
                run(x)
                torch.cuda.synchronize()
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: round(statistics.median(v), 4) for k, v in times.items()}


def run_one(model: str, bits: str, args) -> dict:
    import torch

    import clcalib as lib
    from clcalib.export.onnx_check import export_checked
    from clcalib.export.onnx_qdq import export_onnx
    from clcalib.graph.registry import build_model, read_state_dict
    from clcalib.testing import calibration_indices

    fp = build_model(model, 10, read_state_dict(REFERENCE / f"fmnist_{model}.safetensors"))
    calib, _ = _images("train", calibration_indices(args.calib_size), 28)
    x, y = _images("t10k", range(0, 10000, 10000 // args.eval_size), 28)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = lib.calibrate(fp, calib, {"method": args.method, "w_bits": int(bits[1]), "a_bits": int(bits[3]),
                                    "iters": args.iters, "w_symmetric": True, "device": device,
                                    "calib_size": args.calib_size, "preprocess": PREPROCESS})
    qm = res.model.cpu()
    row = {"model": model, "bits": bits, "method": args.method, "iters": args.iters, "eval_images": len(y)}
    with tempfile.TemporaryDirectory() as d:
        q, f32 = Path(d) / "q.onnx", Path(d) / "fp32.onnx"
        checked, torch_logits = export_checked(qm, q, (1, 3, 28, 28), x, y, target="tensorrt", range_images=calib)
        row.update({k: checked[k] for k in ("onnx_top1", "onnx_top1_agreement")})
        row["torch_top1"] = round(100.0 * float((torch_logits.argmax(1) == y).float().mean()), 2)
        export_onnx(qm, f32, (1, 3, 28, 28), quantized=False)
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            row["tensorrt"] = "skipped: the tensorrt package is not installed"
            return row
        if not torch.cuda.is_available():
            row["tensorrt"] = "skipped: no CUDA device"
            return row
        runs = {"int8": _runner(_engine(q, True, 32)), "fp16": _runner(_engine(f32, False, 32))}
        xs = x.cuda()
        for k, run in runs.items():
            logits = torch.cat([run(b.contiguous()) for b in xs.split(32)])
            row[f"tensorrt_{k}_top1"] = round(100.0 * float((logits.argmax(1).cpu() == y).float().mean()), 2)
        for b in (1, 32):
            ms = _median_ms(runs, xs[:b].contiguous())
            row[f"b{b}"] = {**{f"{k}_ms": v for k, v in ms.items()}, "int8_over_fp16": round(ms["int8"] / ms["fp16"], 3)}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,mobilenet_v2")
    p.add_argument("--bits", default="W8A8,W4A8")
    p.add_argument("--method", default="qdrop")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--eval-size", type=int, default=10000)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    for model in a.models.split(","):
        for bits in a.bits.split(","):
            row = run_one(model, bits, a)
            row["cmd"] = "python -m bench.gpu_tensorrt " + " ".join(argv if argv is not None else sys.argv[1:])
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
