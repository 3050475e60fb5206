"""The model zoo check (issue 30): architectures nobody here wrote, with random weights at a small
input size, through every stage a user's model goes:

  export   torch.export to a .pt2, exactly as the README says (dynamic batch)
  check    the service's upload check (``service.checks``: reads, converts, ONNX-translates)
  inspect  ``clcalib inspect --model m.pt2 --json``
  calibrate  ``clcalib calibrate``'s pipeline: W4A8 qdrop, 2 iterations per unit, 32 images,
           ONNX export checked in ONNX Runtime on 200 labeled Fashion-MNIST images
  reload   ``load_quantized`` of the written checkpoint; its logits against ONNX Runtime's

One JSON row per model is appended to bench/results/zoo.jsonl as soon as the model finishes
(a cut run keeps its rows; a rerun skips models that have a row unless --again). Each model runs
in its own process under a time limit. ``--table`` writes bench/RESULTS_zoo.md from the rows.

    nice -n 10 python -m bench.zoo --limit-s 600          # all models (about an hour on 2 CPU cores)
    nice -n 10 python -m bench.zoo --failed               # again, the models whose last row failed
    python -m bench.zoo --only resnet10t vit_tiny_patch16_224
    python -m bench.zoo --table

timm is a bench extra (``pip install -e .[bench]``), never a runtime dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "zoo.jsonl"
TABLE = HERE / "RESULTS_zoo.md"
STAGES = ["build", "export", "check", "inspect", "calibrate", "reload"]
SIZE = 32

# (source, name, family, constructor kwargs, input size); timm's ViT-likes take img_size
_VIT = {"img_size": SIZE}
MODELS = [
    # ResNet / ResNet-D / ResNeXt / SE
    ("timm", "resnet10t", "ResNet-D", {}, SIZE),
    ("timm", "resnet14t", "ResNet-D", {}, SIZE),
    ("timm", "resnet18d", "ResNet-D", {}, SIZE),
    ("timm", "resnet26d", "ResNet-D", {}, SIZE),
    ("timm", "seresnet18", "ResNet", {}, SIZE),
    ("timm", "resnext26ts", "ResNeXt", {}, SIZE),
    ("timm", "ecaresnet26t", "ResNet-D", {}, SIZE),
    # RegNet
    ("timm", "regnetx_002", "RegNet", {}, SIZE),
    ("timm", "regnety_002", "RegNet", {}, SIZE),
    ("timm", "regnetz_005", "RegNet", {}, SIZE),
    # EfficientNet / MobileNet / NAS
    ("timm", "efficientnet_b0", "EfficientNet", {}, SIZE),
    ("timm", "efficientnet_lite0", "EfficientNet", {}, SIZE),
    ("timm", "efficientnetv2_rw_t", "EfficientNet", {}, SIZE),
    ("timm", "tf_efficientnet_b0", "EfficientNet", {}, SIZE),
    ("timm", "mobilenetv3_small_050", "MobileNetV3", {}, SIZE),
    ("timm", "mobilenetv3_large_100", "MobileNetV3", {}, SIZE),
    ("timm", "mobilenetv4_conv_small", "MobileNetV4", {}, SIZE),
    ("timm", "mixnet_s", "MixNet", {}, SIZE),
    ("timm", "lcnet_050", "LCNet", {}, SIZE),
    ("timm", "tinynet_e", "EfficientNet", {}, SIZE),
    ("timm", "fbnetc_100", "NAS", {}, SIZE),
    ("timm", "rexnet_100", "ReXNet", {}, SIZE),
    # GhostNet / RepVGG / re-parameterised
    ("timm", "ghostnet_100", "GhostNet", {}, SIZE),
    ("timm", "ghostnetv2_100", "GhostNet", {}, 64),  # its attention pools by 4 after the stem: 32 px ends at 0x0
    ("timm", "repghostnet_050", "GhostNet", {}, SIZE),
    ("timm", "repvgg_a0", "RepVGG", {}, SIZE),
    ("timm", "mobileone_s0", "RepVGG", {}, SIZE),
    ("timm", "fastvit_t8", "FastViT", {}, SIZE),
    # ConvNeXt / EdgeNeXt / MetaFormer
    ("timm", "convnext_atto", "ConvNeXt", {}, SIZE),
    ("timm", "convnextv2_atto", "ConvNeXt", {}, SIZE),
    ("timm", "edgenext_xx_small", "EdgeNeXt", {}, SIZE),
    ("timm", "poolformer_s12", "MetaFormer", {}, SIZE),
    ("timm", "ese_vovnet19b_dw", "VoVNet", {}, SIZE),
    ("timm", "cspresnet50", "CSPNet", {}, SIZE),
    # ViT / DeiT / Swin / MobileViT / CoAtNet / MaxViT
    ("timm", "vit_tiny_patch16_224", "ViT", _VIT, SIZE),
    ("timm", "deit_tiny_patch16_224", "DeiT", _VIT, SIZE),
    ("timm", "deit_tiny_distilled_patch16_224", "DeiT", _VIT, SIZE),
    ("timm", "vit_small_patch16_224", "ViT", {**_VIT, "depth": 4}, SIZE),
    ("timm", "swin_tiny_patch4_window7_224", "Swin", {**_VIT, "window_size": 4, "depths": (2, 2, 2, 2)}, SIZE),
    ("timm", "mobilevit_xxs", "MobileViT", {}, SIZE),
    ("timm", "mobilevitv2_050", "MobileViT", {}, SIZE),
    ("timm", "coatnet_nano_rw_224", "CoAtNet", _VIT, SIZE),
    ("timm", "maxvit_nano_rw_256", "MaxViT", {"img_size": 64}, 64),
    ("timm", "levit_128s", "LeViT", _VIT, SIZE),
    ("timm", "efficientvit_b0", "EfficientViT", {}, SIZE),  # (EfficientFormer's attention is fixed at 224 px)
    # torchvision's
    ("torchvision", "resnet18", "ResNet", {}, SIZE),
    ("torchvision", "mobilenet_v3_small", "MobileNetV3", {}, SIZE),
    ("torchvision", "shufflenet_v2_x0_5", "ShuffleNet", {}, SIZE),
    ("torchvision", "squeezenet1_1", "SqueezeNet", {}, SIZE),
    ("torchvision", "efficientnet_b0", "EfficientNet", {}, SIZE),
    ("torchvision", "regnet_y_400mf", "RegNet", {}, SIZE),
    ("torchvision", "densenet121", "DenseNet", {}, SIZE),
    ("torchvision", "mnasnet0_5", "MnasNet", {}, SIZE),
    ("torchvision", "convnext_tiny", "ConvNeXt", {}, SIZE),
    ("torchvision", "swin_t", "Swin", {}, SIZE),
]
BY_NAME = {f"{src}:{name}": (src, name, fam, kw, size) for src, name, fam, kw, size in MODELS}
CONFIG = {"method": "qdrop", "w_bits": 4, "a_bits": 8, "iters": 2, "calib_size": 32, "batch_size": 16,
          "export": ["onnx"], "device": "cpu", "seed": 0}
CALIB_IMAGES, EVAL_IMAGES = 64, 200


def _build(src: str, name: str, kw: dict):
    import torch

    torch.manual_seed(0)
    if src == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=10, **kw).eval()


def _data(work: Path, size: int) -> tuple[Path, Path, dict]:
    from clcalib.testing import calibration_indices, write_zip

    calib = write_zip(work / "calib.zip", "train", calibration_indices(CALIB_IMAGES), by_class=False)
    evaluation = write_zip(work / "eval.zip", "t10k", range(EVAL_IMAGES), by_class=True)
    return calib, evaluation, {"mean": [0.286], "std": [0.353]}  # resize/crop: the program's input size


def run_one(key: str, work: Path, emit) -> None:
    """Every stage of one model; ``emit(stage, **fields)`` after each (the parent keeps the last)."""
    import torch

    torch.set_num_threads(1)
    src, name, fam, kw, size = BY_NAME[key]
    model = _build(src, name, kw)
    emit("build", params=sum(p.numel() for p in model.parameters()))

    x = torch.randn(2, 3, size, size)
    pt2 = work / f"{name}.pt2"
    torch.export.save(torch.export.export(model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)), pt2)
    emit("export", pt2_bytes=pt2.stat().st_size)

    calib, evaluation, pre = _data(work, size)
    config = {**CONFIG, "preprocess": pre}
    from jobs.store import PROGRAM
    from service.checks import _check_job

    res = _check_job(model=str(pt2), arch=PROGRAM, num_classes=None, calibration=str(calib), evaluation=str(evaluation),
                     config=config, limits={}, sample=8, preprocess_given=sorted(pre))
    if not res["ok"]:
        emit("check", refused=f"{res['code']}: {res['message']}")
        return
    emit("check")

    import contextlib
    import io

    from clcalib.cli import main as cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli(["inspect", "--model", str(pt2), "--json", "--w-bits", "4", "--a-bits", "8"])
    if rc:
        raise RuntimeError(f"inspect exited {rc}")
    units = json.loads(buf.getvalue())
    emit("inspect", units=len(units), layers=sum(len(u["layers"]) for u in units))

    from clcalib.config import CalibConfig
    from clcalib.pipeline import run_calibration

    t0 = time.perf_counter()
    report = run_calibration(model=str(pt2), calibration=str(calib), evaluation=str(evaluation),
                             config=CalibConfig.model_validate(config), out_dir=work / "out")
    m = report["metrics"]
    fields = {k: m.get(k) for k in ("fp_top1", "quant_top1", "onnx_top1", "onnx_top1_agreement", "top1_agreement")}
    if m.get("export_error") or m.get("onnx_top1_agreement") is None:
        emit("calibrate", seconds=round(time.perf_counter() - t0, 1),
             late_failure=m.get("export_error") or "no ONNX figures in the report", **fields)
        return
    emit("calibrate", seconds=round(time.perf_counter() - t0, 1), **fields)

    from clcalib.export import load_quantized
    from clcalib.export.onnx_check import session
    from clcalib.metrics import predict

    reloaded = load_quantized(work / "out" / "quantized.safetensors")
    from clcalib.config import Preprocess
    from clcalib.data import LabeledSet

    images = next(LabeledSet(evaluation, Preprocess.model_validate(reloaded.header["preprocess"])).images(64))
    ref = predict(reloaded, images)
    got = torch.from_numpy(session(work / "out" / "model.onnx").run(None, {"input": images.numpy()})[0])
    agree = float((ref.argmax(1) == got.argmax(1)).float().mean() * 100)
    emit("reload", reload_onnx_agreement=round(agree, 1), reload_finite=bool(torch.isfinite(ref).all()))


def child(key: str) -> int:
    """``--one KEY``: run one model, printing one JSON line per stage reached."""
    def emit(stage, **fields):
        print(json.dumps({"stage": stage, **fields}), flush=True)

    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        try:
            run_one(key, Path(tmp), emit)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:400]
            print(json.dumps({"error": f"{type(e).__name__}: {first}",
                              "where": traceback.format_exc().strip().splitlines()[-3][:300]}), flush=True)
            return 1
    return 0


def parent(keys: list[str], limit_s: int, again: bool) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    done = set() if again else {r["model"] for r in rows()}
    for key in keys:
        if key in done:
            continue
        src, name, fam, _, size = BY_NAME[key]
        t0 = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            p = subprocess.run([sys.executable, "-m", "bench.zoo", "--one", key], capture_output=True, text=True,
                               timeout=limit_s, cwd=HERE.parent, env=env)
            out, timed_out = p.stdout, False
        except subprocess.TimeoutExpired as e:
            out, timed_out = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""), True
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        stages = [e for e in events if "stage" in e]
        row = {"model": key, "source": src, "name": name, "family": fam, "input": size,
               "stage": stages[-1]["stage"] if stages else None, "seconds": round(time.perf_counter() - t0, 1)}
        for e in stages:
            row.update({k: v for k, v in e.items() if k != "stage"})
        err = next((e for e in events if "error" in e), None)
        if timed_out:
            row["reason"] = f"time limit of {limit_s} s in the stage after {row['stage']}"
        elif err is not None:
            row["reason"] = f"{err['error']} ({err['where'].strip()})"
        elif row.get("refused"):
            row["reason"] = "refused at upload: " + row.pop("refused")
        elif row.get("late_failure"):
            row["reason"] = "after calibration: " + row.pop("late_failure")
        elif not stages:
            row["reason"] = (p.stderr.strip().splitlines() or ["no output"])[-1][:400]
        row["passed"] = row["stage"] == STAGES[-1] and "reason" not in row
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{key}: {'ok' if row['passed'] else row.get('reason')} ({row['seconds']} s)", flush=True)


def rows() -> list[dict]:
    """The latest row of each model."""
    if not RESULTS.is_file():
        return []
    latest = {}
    for line in RESULTS.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            latest[r["model"]] = r
    return list(latest.values())


def table() -> str:
    rs = sorted((r for r in rows() if r["model"] in BY_NAME), key=lambda r: list(BY_NAME).index(r["model"]))
    n = len(rs)
    passed = sum(r["passed"] for r in rs)
    refused = sum(str(r.get("reason", "")).startswith("refused at upload") for r in rs)
    lines = [
        "# Model zoo check (issue 30)",
        "",
        "Random weights, 3-channel input at 32 px (MaxViT and GhostNetV2 at 64), Fashion-MNIST images resized to it (no resize/crop "
        "given: the program's input size is the default); W4A8 qdrop, "
        "2 iterations per unit, 32 calibration images, ONNX QDQ export checked in ONNX Runtime on 200 labeled "
        "images, checkpoint reloaded. Random weights: the top-1 figures are near chance and only say that the "
        "quantized model, the reloaded checkpoint and ONNX Runtime agree. Made by:",
        "",
        "    nice -n 10 python -m bench.zoo --limit-s 600 && python -m bench.zoo --table",
        "",
        f"**{passed} of {n} through every stage** ({100 * passed / max(n, 1):.0f} %); {refused} refused by name at "
        f"upload; {n - passed - refused} failed otherwise. Each row is the model's latest run: the models that "
        "failed a first pass were rerun (`--failed`) after the fixes it led to; bench/results/zoo.jsonl keeps every "
        "run.",
        "",
        "| model | family | params | stage reached | units | ONNX agreement % | reload vs ORT % | s | reason |",
        "|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rs:
        p = r.get("params")
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["model"], r["family"], f"{p / 1e6:.1f}M" if p else "-", r["stage"] or "-", r.get("units", "-"),
            _num(r.get("onnx_top1_agreement")), _num(r.get("reload_onnx_agreement")), r["seconds"],
            str(r.get("reason", "")).replace("|", "/")[:300]))
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="+", help="model names (timm or torchvision, or source:name)")
    ap.add_argument("--limit-s", type=int, default=600, help="per-model time limit (default 600 s)")
    ap.add_argument("--again", action="store_true", help="rerun models that already have a row")
    ap.add_argument("--failed", action="store_true", help="rerun the models whose latest row did not pass")
    ap.add_argument("--table", action="store_true", help="write bench/RESULTS_zoo.md from the rows and stop")
    a = ap.parse_args(argv)
    if a.one:
        return child(a.one)
    if a.table:
        TABLE.write_text(table())
        print(TABLE.read_text())
        return 0
    keys = list(BY_NAME)
    if a.failed:
        passed = {r["model"] for r in rows() if r["passed"]}
        keys, a.again = [k for k in keys if k not in passed], True
    if a.only:
        keys = [k for k in keys if k in a.only or k.split(":", 1)[1] in a.only]
    parent(keys, a.limit_s, a.again)
    return 0


if __name__ == "__main__":
    sys.exit(main())
