"""How fast the exported file runs: its median latency against the FP32 export of the same
model in the same runtime, measured in one process with the two files interleaved in rounds
(so that a busy machine slows both alike and the ratio holds)."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn

ROUNDS, PER_ROUND, WARMUP = 5, 8, 3  # timed runs: ROUNDS x PER_ROUND per file and batch size


def _runner(path: Path, runtime: str, threads: int | None) -> Callable[[np.ndarray], object]:
    if runtime == "openvino":
        from clcalib.export.openvino_check import compiled

        request = compiled(path, threads).create_infer_request()
        return lambda x: request.infer({0: x})
    from clcalib.export.onnx_check import session

    s = session(path, threads)
    name = s.get_inputs()[0].name
    return lambda x: s.run(None, {name: x})


def median_ms(files: dict[str, Path], runtime: str, x: np.ndarray, threads: int | None = None) -> dict[str, float]:
    """Median milliseconds per call of each file on ``x``, interleaved in rounds."""
    runs = {k: _runner(p, runtime, threads) for k, p in files.items()}
    times: dict[str, list[float]] = {k: [] for k in files}
    for _ in range(ROUNDS):
        for k, run in runs.items():
            for _ in range(WARMUP):
                run(x)
            for _ in range(PER_ROUND):
                t = time.perf_counter()
                run(x)
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def latency_vs_fp32(model: nn.Module, path: str | Path, input_shape: tuple[int, ...], batches: tuple[int, ...],
                    runtime: str = "onnxruntime", threads: int | None = None) -> dict:
    """The file at ``path`` against the FP32 export of ``model`` (a QuantModel) in ``runtime``:
    ``{"runtime", "batches": {"1": {"ms", "fp32_ms", "x_fp32"}, ...}}`` (x_fp32 < 1: faster)."""
    from clcalib.export.onnx_qdq import export_onnx

    out: dict = {"runtime": runtime, "batches": {}}
    with tempfile.TemporaryDirectory() as d:
        fp32 = Path(d) / "fp32.onnx"
        export_onnx(model, fp32, input_shape, quantized=False)
        for b in dict.fromkeys(batches):
            x = np.random.default_rng(0).standard_normal((b, *input_shape[1:])).astype(np.float32)
            ms = median_ms({"q": Path(path), "fp32": fp32}, runtime, x, threads)
            out["batches"][str(b)] = {"ms": round(ms["q"], 4), "fp32_ms": round(ms["fp32"], 4),
                                      "x_fp32": round(ms["q"] / ms["fp32"], 3)}
    return out
