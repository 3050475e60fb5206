"""Qualcomm AIMET's automatic mixed precision (AMP, aimet_torch.mixed_precision.choose_mixed_precision)
on our Fashion-MNIST reference resnet18, for a side-by-side with clcalib's mixed precision.

Stand-alone: runs with the Python of a virtualenv that has aimet-torch (never the project's
Python; nothing here imports clcalib). The data/model protocol is the project's: torchvision
resnet18 (num_classes 10) with /work/shared/reference/fmnist_resnet18.safetensors, Fashion-MNIST
28x28 gray replicated to 3 channels, /255, (x-0.286)/0.353; calibration = the 1024 train images
np.sort(np.random.default_rng(0).permutation(60000)[:1024]); final top-1 on all 10000 test images.

AIMET flow (its documented PTQ + AMP recipe, nothing of theirs edited):
  prepare_model -> fold_all_batch_norms -> QuantizationSimModel(W8A8 default bitwidths, --quant-scheme, --config)
  -> compute_encodings on the 1024 calibration images -> choose_mixed_precision with candidates
  A8 x W{8,4,3,2} (baseline W8A8), allowed accuracy drop --allowed-drop points of top-1 on an
  evaluation subset (AMP takes an allowed drop, not a size budget; its cost model is BitOps).
  AMP leaves the sim at the mixed configuration it found; we then measure top-1 on the full 10k
  and the stored weight size the way clcalib counts it (clcalib/quant/sites.py layer_bytes:
  packed codes + per-channel fp32 scale and uint8 zero point + fp32 bias, BN folded).
  --budget-point additionally takes AMP's own phase-1 sensitivity order (its accuracy list) and
  applies the longest prefix of it whose stored size fits the size of uniform W3 with the first
  conv and fc at W8 (clcalib's budget for this model), i.e. the first point of AMP's cumulative
  walk that fits, and measures that on the full 10k too; --uniform-ref measures AIMET's plain sim
  at uniform W3 (first conv and fc W8) for reference.

Reproduce (CPU, one thread):
    python3 -m venv --system-site-packages /tmp/aimet-venv   # reuses the machine's torch/torchvision
    /tmp/aimet-venv/bin/pip install aimet-torch==2.42.0
    OMP_NUM_THREADS=1 /tmp/aimet-venv/bin/python bench/peer_aimet_amp.py --threads 1 --budget-point --uniform-ref
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
FMNIST = Path(os.environ.get("CLCALIB_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
REFERENCE = Path(os.environ.get("CLCALIB_REFERENCE_DIR", "/work/shared/reference"))
MEAN, STD = 0.286, 0.353


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def split(name: str):
    return read_idx(FMNIST / f"{name}-images-idx3-ubyte.gz"), read_idx(FMNIST / f"{name}-labels-idx1-ubyte.gz")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None].repeat(1, 3, 1, 1)
    return (x - MEAN) / STD


def load_model() -> torch.nn.Module:
    import torchvision
    from safetensors.torch import load_file
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(load_file(str(REFERENCE / "fmnist_resnet18.safetensors")))
    return model.eval()


@torch.no_grad()
def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), bs):
        correct += (model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum().item()
    return 100.0 * correct / len(x)


def quant_layers(sim) -> dict:
    """name -> wrapped conv/linear module of the sim (the layers whose weights are quantized)."""
    out = {}
    for name, mod in sim.model.named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and hasattr(mod, "param_quantizers"):
            out[name] = mod
    return out


def weight_bits(mod) -> int | None:
    q = mod.param_quantizers["weight"]
    if q is None:
        return None
    return int(q.bitwidth)


def layer_bytes(mod, bits: int) -> int:
    """clcalib's accounting (clcalib/quant/sites.py layer_bytes): packed codes, per-output-channel
    float32 scale + uint8 zero point, float32 bias (BN folded: every conv has out_channels biases)."""
    w = mod.weight
    return math.ceil(w.numel() * bits / 8) + 5 * w.shape[0] + 4 * w.shape[0]


def size_of(layers: dict, bits: dict) -> dict:
    n = sum(m.weight.numel() for m in layers.values())
    return {"weight_bytes": sum(layer_bytes(m, bits[k]) for k, m in layers.items()),
            "w_bits_avg": sum(m.weight.numel() * bits[k] for k, m in layers.items()) / n,
            "params": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--eval-phase1", type=int, default=1000, help="test images for AMP's phase-1 eval callback "
                    "(every 10000/N-th test image)")
    ap.add_argument("--eval-phase2", type=int, default=2000, help="test images for AMP's phase-2 eval callback")
    ap.add_argument("--allowed-drop", type=float, default=1.0, help="AMP's allowed top-1 drop (points) vs FP")
    ap.add_argument("--w-bits", default="8,4,3,2", help="weight bit candidates (first = baseline)")
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--quant-scheme", default="tf_enhanced", choices=["tf", "tf_enhanced"])
    ap.add_argument("--config", default="default_config_per_channel.json",
                    help="an AIMET quantsim config file name (its quantsim_config dir) or path")
    ap.add_argument("--phase1-optimize", type=int, default=1)
    ap.add_argument("--budget-point", action="store_true", help="also evaluate AMP's sensitivity order cut at "
                    "clcalib's size budget (uniform W3, first conv and fc W8)")
    ap.add_argument("--uniform-ref", action="store_true", help="also measure AIMET's plain (non-mixed) sim at "
                    "clcalib's budget: uniform W3, first conv and fc W8, A8")
    ap.add_argument("--reuse-cache", action="store_true", help="clean_start=False: reuse AMP's cached phase-1 "
                    "accuracy list and phase-2 pareto points from --results-dir (same settings only)")
    ap.add_argument("--results-dir", default="/tmp/aimet_amp_results")
    ap.add_argument("--out", default=str(HERE / "results" / "cpu_peer_aimet_amp.jsonl"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    import aimet_torch
    import aimet_torch.common.quantsim_config as qcfg
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from aimet_torch.common.defs import CallbackFunc, QuantizationDataType, QuantScheme
    from aimet_torch.mixed_precision import choose_mixed_precision
    from aimet_torch.model_preparer import prepare_model
    from aimet_torch.quantsim import QuantizationSimModel

    cfg = args.config if os.path.isfile(args.config) else str(Path(qcfg.__file__).parent / args.config)

    tr_x, _ = split("train")
    te_x, te_y = split("t10k")
    calib_idx = np.sort(np.random.default_rng(0).permutation(60000)[: args.calib])
    x_cal = to_tensor(tr_x[calib_idx])
    x_te, y_te = to_tensor(te_x), torch.from_numpy(te_y.astype(np.int64))

    def subset(n):
        idx = np.arange(0, 10000, 10000 // n)[:n]
        return x_te[idx], y_te[idx]

    x_p1, y_p1 = subset(args.eval_phase1)
    x_p2, y_p2 = subset(args.eval_phase2)

    model = load_model()
    fp_top1 = top1(model, x_te, y_te)
    print(f"FP top-1 (10k): {fp_top1:.2f}", flush=True)

    dummy = torch.randn(1, 3, 28, 28)
    # AIMET's documented first step: torchvision's BasicBlock reuses self.relu twice, which makes
    # QuantizationSimModel disable that quantizer and leaves every conv2 outside AMP's quantizer
    # groups (stuck at W8); prepare_model (torch.fx) gives each use its own module
    model = prepare_model(model)
    folded = fold_all_batch_norms(model, input_shapes=(1, 3, 28, 28))
    print(f"folded {len(folded)} batch norms", flush=True)
    scheme = {"tf": QuantScheme.post_training_tf, "tf_enhanced": QuantScheme.post_training_tf_enhanced}[args.quant_scheme]
    sim = QuantizationSimModel(model, dummy_input=dummy, quant_scheme=scheme, default_output_bw=args.a_bits,
                               default_param_bw=8, config_file=cfg)

    def forward_pass(m, _):
        with torch.no_grad():
            for i in range(0, len(x_cal), 256):
                m(x_cal[i:i + 256])

    n_evals = {"phase1": 0, "phase2": 0}

    def eval_p1(m, *_):
        n_evals["phase1"] += 1
        return top1(m, x_p1, y_p1)

    def eval_p2(m, *_):
        n_evals["phase2"] += 1
        return top1(m, x_p2, y_p2)

    t = time.perf_counter()
    sim.compute_encodings(forward_pass, None)
    w8a8_top1 = top1(sim.model, x_te, y_te)
    print(f"W8A8 sim top-1 (10k): {w8a8_top1:.2f}  ({time.perf_counter() - t:.1f}s)", flush=True)

    w_bits = [int(b) for b in args.w_bits.split(",")]
    A = (args.a_bits, QuantizationDataType.int)
    candidates = [(A, (b, QuantizationDataType.int)) for b in w_bits]
    t_amp = time.perf_counter()
    pareto = choose_mixed_precision(
        sim, dummy, candidates, eval_p1, eval_p2, args.allowed_drop, args.results_dir, not args.reuse_cache,
        CallbackFunc(forward_pass, None), use_all_amp_candidates=True,
        phase1_optimize=bool(args.phase1_optimize))
    amp_seconds = time.perf_counter() - t_amp
    print(f"AMP done in {amp_seconds:.1f}s", flush=True)

    layers = quant_layers(sim)
    bits = {k: weight_bits(m) for k, m in layers.items()}
    amp_top1 = top1(sim.model, x_te, y_te)
    amp_size = size_of(layers, bits)
    first, last = list(layers)[0], list(layers)[-1]
    budget_bits = {k: (8 if k in (first, last) else 3) for k in layers}
    budget = size_of(layers, budget_bits)
    print(f"AMP result: top-1 {amp_top1:.2f} on 10k, {amp_size}; budget {budget}", flush=True)
    print("AMP layer bits:", bits, flush=True)

    row = {
        "peer": "aimet_amp", "aimet_torch": aimet_torch.__version__, "model": "resnet18",
        "what": ("AIMET choose_mixed_precision: BN folded, QuantizationSimModel "
                 f"{args.quant_scheme} {Path(cfg).name}, A{args.a_bits} everywhere, weight candidates {w_bits}, "
                 f"allowed top-1 drop {args.allowed_drop} on {args.eval_phase2} test images (phase 1 on "
                 f"{args.eval_phase1}); rounding to nearest, no AdaRound/reconstruction"),
        "allowed_drop": args.allowed_drop, "quant_scheme": args.quant_scheme, "config": Path(cfg).name,
        "calib_size": args.calib, "eval_phase1": args.eval_phase1, "eval_phase2": args.eval_phase2,
        "fp_top1": fp_top1, "w8a8_top1": w8a8_top1, "quant_top1": amp_top1,
        "weight_bytes": amp_size["weight_bytes"], "w_bits_avg": amp_size["w_bits_avg"], "params": amp_size["params"],
        "layer_bits": bits, "budget_uniform_w3_bytes": budget["weight_bytes"],
        "budget_uniform_w3_bits_avg": budget["w_bits_avg"],
        "amp_seconds": amp_seconds, "evals": dict(n_evals),
        "pareto_points": [[float(p[0]), float(p[1]), str(p[2]), str(p[3][1][0]) if len(p[3]) == 2 else None]
                          for p in (pareto or [])],
    }

    if args.budget_point:
        # AMP's own phase-1 sensitivity order (accuracy list), applied cumulatively the way its phase 2
        # does; the longest prefix whose stored size fits the budget
        import pickle
        cache = os.path.join(args.results_dir, ".cache", "accuracy_list.pkl")
        acc_list = pickle.load(open(cache, "rb")) if os.path.isfile(cache) else []  # none when AMP exited early
        base = {k: 8 for k in layers}
        best = None
        cur = dict(base)
        for i, (qg, cand, _, _) in enumerate(acc_list):
            for name in qg.parameter_quantizers:
                if name in cur and len(cand) == 2:
                    cur[name] = cand[1][0]
            if size_of(layers, cur)["weight_bytes"] <= budget["weight_bytes"]:
                best = (i, dict(cur))  # the first point of AMP's walk within the budget (its most accurate one)
                break
        if best is None:
            row["budget_point"] = None
        else:
            for k, m in layers.items():
                m.param_quantizers["weight"].bitwidth = best[1][k]
            sim.compute_encodings(forward_pass, None)
            bp_top1 = top1(sim.model, x_te, y_te)
            bp_size = size_of(layers, best[1])
            row["budget_point"] = {"prefix_len": best[0] + 1, "of": len(acc_list), "quant_top1": bp_top1,
                                   "weight_bytes": bp_size["weight_bytes"], "w_bits_avg": bp_size["w_bits_avg"],
                                   "layer_bits": best[1]}
            print(f"budget point: top-1 {bp_top1:.2f}, {bp_size}", flush=True)

    if args.uniform_ref:
        for k, m in layers.items():
            m.param_quantizers["weight"].bitwidth = budget_bits[k]
        sim.compute_encodings(forward_pass, None)
        row["uniform_w3_first_last_w8"] = {"quant_top1": top1(sim.model, x_te, y_te), **budget}
        print(f"uniform W3 (first/last W8) A8: {row['uniform_w3_first_last_w8']}", flush=True)

    row.update({"reused_cache": args.reuse_cache, "wall_seconds": time.perf_counter() - t_start, "threads": args.threads,
                "torch": torch.__version__, "python": platform.python_version(),
                "cpu_count": os.cpu_count(), "cmd": " ".join([Path(sys.executable).as_posix()] + sys.argv)})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in ("layer_bits", "pareto_points")}), flush=True)


if __name__ == "__main__":
    main()
