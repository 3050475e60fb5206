"""The official QDrop code (github wimh966/QDrop, branch qdrop) on our Fashion-MNIST setup, for
side-by-side figures with clcalib: the same reference resnet18, the same 1024 calibration
images and preprocessing, the same 10k test images.

Their code is never committed here: `bash bench/make_gpu_carry.sh --peer-only` exports it
from a fetched mirror into .gpu/peer/ (ignored), and this script imports it from --peer-dir at
run time. It drives their pieces the way their ImageNet entry point (qdrop/solver/
main_imagenet.py: main) does, with their config exp/w2a4/r18/config.yaml changed only in bits,
iters, num_classes and data: their set_seed, their resnet18 (our weights loaded into it),
search_fold_and_remove_bn, quantize_model, observer calibration on the first 256 / 2 images,
block reconstruction with their reconstruction() on every QuantizedLayer/QuantizedBlock, and
validate_model. Nothing of theirs is edited: on --device cpu their .cuda() calls are made
no-ops for the run. One JSON row per run is appended to --out.

CPU smoke (here, one thread: about 2 min at --iters 20, 5 min at 200, with the full 10k
evaluation; --eval-limit N evaluates every (10000/N)-th test image instead):
    bash bench/make_gpu_carry.sh --peer-only
    PYTHONPATH=$PWD python -m bench.peer_qdrop --peer-dir .gpu/peer --bits W2A4 --iters 20 \\
        --device cpu --threads 1 --out /tmp/peer_smoke.jsonl
GPU (a device call with carry [".gpu"] after `bash bench/make_gpu_carry.sh`; clcalib's data
code needs pydantic, installed from .gpu/whl as bench/gpu_run.sh does):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
    PYTHONPATH=$PWD:/tmp/site python3 -m bench.peer_qdrop --peer-dir .gpu/peer --data-dir .gpu \\
        --reference-dir .gpu --bits W2A4 --iters 2000 --device cuda --out $OUT/peer_qdrop.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import types
from pathlib import Path

from bench.accuracy import WORK, code_version, cpu_model, prepare_data
from clcalib.testing import PREPROCESS, REFERENCE

CONFIG = "exp/w2a4/r18/config.yaml"  # the branch's only ResNet-18 config; other bits change its bit fields
BITS = ("W2A4", "W4A4", "W2A2", "W4A2")


def official_config(peer: Path) -> dict:
    """Their r18 config as a dict: from the YAML where PyYAML is installed, else from the JSON copy
    the carry builder writes beside the tree (the device image may lack PyYAML)."""
    try:
        import yaml
    except ImportError:
        copy_ = peer / "CONFIGS.json"
        if not copy_.is_file():
            raise SystemExit(f"PyYAML is not installed and {copy_} is missing: re-export the tree with "
                             "`bash bench/make_gpu_carry.sh --peer-only` (it writes that JSON copy)") from None
        return json.loads(copy_.read_text())[CONFIG]
    return yaml.safe_load((peer / CONFIG).read_text())


def namespace(d):
    """Attribute access, as their code reads configs (they use EasyDict, which may be missing)."""
    if isinstance(d, dict):
        return types.SimpleNamespace(**{k: namespace(v) for k, v in d.items()})
    return d


def import_official(peer: Path):
    """Their modules, imported from ``peer``. main_imagenet.py imports its siblings (recon,
    imagenet_utils, fold_bn) as top-level modules, so qdrop/solver goes on sys.path too. Their
    imagenet_utils imports easydict and yaml, and observer.py scipy, at the top for code this
    runner never calls (parse_config, the golden-section observers): where one is missing a stub
    stands in, and it fails loudly if that code is ever reached."""
    def unavailable(*_a, **_k):
        raise RuntimeError("reached QDrop code that needs a package missing here (easydict/yaml/scipy)")

    for mod, attr in (("easydict", "EasyDict"), ("yaml", "load"), ("scipy.optimize", "minimize_scalar")):
        try:
            importlib.import_module(mod)
        except ImportError:
            for part in (mod.split(".")[0], mod):
                sys.modules.setdefault(part, types.ModuleType(part))
            setattr(sys.modules[mod], attr, unavailable)
    import torch

    if not hasattr(torch, "_aminmax"):  # their observers call it; deprecated since torch 1.11
        torch._aminmax = lambda x, dim=None: torch.aminmax(x) if dim is None else torch.aminmax(x, dim=dim)
    for p in (peer / "qdrop/solver", peer):
        sys.path.insert(0, str(p))
    import fold_bn
    import imagenet_utils
    import main_imagenet
    import recon
    from qdrop.model import resnet
    from qdrop.quantization import quantized_module, state
    from qdrop.quantization.observer import ObserverBase

    return types.SimpleNamespace(fold_bn=fold_bn, utils=imagenet_utils, main=main_imagenet, recon=recon,
                                 resnet=resnet, qm=quantized_module, state=state, ObserverBase=ObserverBase)


@contextlib.contextmanager
def cuda_calls_stay_on_cpu():
    """Their code calls .cuda() (model and data in main, tensors in the fast MSE observers); for a
    CPU run those become no-ops while the run lasts, rather than edits to their files."""
    import torch

    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


def peer_commit(peer: Path) -> str:
    f = peer / "COMMIT"
    if f.is_file():
        return f.read_text().strip()
    r = subprocess.run(["git", "-C", str(peer), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "unknown (no COMMIT file; export with bench/make_gpu_carry.sh)"


def preprocess(resize: int | None) -> dict:
    """The reference preprocessing, with the 28 px images resized to ``resize`` (the 224 px timing)."""
    return {**PREPROCESS, "resize": resize} if resize else PREPROCESS


def load_data(data_dir: Path, eval_limit: int | None, resize: int | None = None):
    """Our 1024 calibration images and the test set, through clcalib's own loader and the
    reference models' preprocessing (what bench/accuracy.py runs clcalib on)."""
    import torch

    from clcalib.config import Preprocess
    from clcalib.data import LabeledSet, load_calibration

    calib_zip, test_zip = prepare_data(data_dir)
    pre = Preprocess(**preprocess(resize))
    calib = load_calibration(calib_zip, pre, size=1024)
    test = LabeledSet(test_zip, pre)
    images, labels = zip(*test.batches(1000), strict=True)
    images, labels = torch.cat(images), torch.cat(labels)
    if eval_limit is not None and eval_limit < len(images):
        # every k-th image: the zip is ordered by class, so a prefix would hold one class only
        step = len(images) // eval_limit
        images, labels = images[::step][:eval_limit], labels[::step][:eval_limit]
    return calib, images, labels


def run(a) -> dict:
    import torch

    from clcalib.graph.registry import build_model, read_state_dict

    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; use --device cpu")

    def sync():  # CUDA work is asynchronous: times are taken after it finishes
        if dev.type == "cuda":
            torch.cuda.synchronize()

    peer = a.peer_dir.resolve()
    if not (peer / "qdrop/solver/main_imagenet.py").is_file():
        raise SystemExit(f"{peer}: not an exported QDrop tree (no qdrop/solver/main_imagenet.py); "
                         "run `bash bench/make_gpu_carry.sh --peer-only` or pass --peer-dir")
    cfg = official_config(peer)  # before the stubs: a stubbed yaml would hide a missing PyYAML
    q = import_official(peer)
    w, act = int(a.bits[1]), int(a.bits[3])
    cfg["quant"]["w_qconfig"]["bit"], cfg["quant"]["a_qconfig"]["bit"] = w, act
    cfg["quant"]["recon"]["iters"] = a.iters
    cfg["model"]["kwargs"]["num_classes"] = 10
    cfg["model"]["path"] = str(a.reference_dir / "fmnist_resnet18.safetensors")
    cfg["data"] = {"calibration": "clcalib.testing.calibration_indices(1024, seed=0) of the train split",
                   "test": "the 10k test split", "preprocess": preprocess(a.resize)}
    quant = namespace(cfg["quant"])

    q.utils.set_seed(a.seed)  # their main's first step (also cudnn.deterministic)
    calib, test_x, test_y = load_data(a.data_dir, a.eval_limit, a.resize)
    if len(calib) != quant.calibrate:
        raise SystemExit(f"{len(calib)} calibration images, their config wants {quant.calibrate}")
    val_loader = [(test_x[i:i + 256], test_y[i:i + 256]) for i in range(0, len(test_x), 256)]

    # torchvision resnet18 with the reference weights, moved into their model zoo's resnet18
    # (quantize_model only knows their BasicBlock); the state dicts name every tensor alike
    tv = build_model("resnet18", 10, read_state_dict(cfg["model"]["path"]))
    model = q.resnet.resnet18(num_classes=10)
    mism = model.load_state_dict(tv.state_dict(), strict=False)
    if mism.missing_keys or mism.unexpected_keys:
        raise SystemExit(f"their resnet18 and torchvision's differ: missing {mism.missing_keys[:5]}, "
                         f"unexpected {mism.unexpected_keys[:5]}; the state dict needs a key map")
    model.eval()
    with torch.no_grad():
        diff = (model(calib[:64]) - tv(calib[:64])).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"their resnet18 computes something else than torchvision's (max logit diff {diff:.2e})")

    # main_imagenet.main from here, on our data
    q.fold_bn.search_fold_and_remove_bn(model)
    model = q.main.quantize_model(model, quant)
    model.to(dev).eval()
    fp_model = copy.deepcopy(model)
    q.state.disable_all(fp_model)
    for name, m in model.named_modules():
        if isinstance(m, q.ObserverBase):
            m.set_name(name)
    fp_top1 = float(q.utils.validate_model(val_loader, fp_model))

    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        q.state.enable_calibration_woquantization(model, quantizer_type="act_fake_quant")
        model(calib[:256].to(dev))
        q.state.enable_calibration_woquantization(model, quantizer_type="weight_fake_quant")
        model(calib[:2].to(dev))
    sync()
    observer_s = time.perf_counter() - t0
    q.state.enable_quantization(model)
    # outside the timed part; draws no random numbers, so the reconstruction is unchanged
    pre_recon_top1 = float(q.utils.validate_model(val_loader, model))

    def recon_model(module, fp_module):  # main's nested recon_model: every layer/block in order
        for name, child in module.named_children():
            if isinstance(child, (q.qm.QuantizedLayer, q.qm.QuantizedBlock)):
                q.recon.reconstruction(model, fp_model, child, getattr(fp_module, name), calib, quant.recon)
            else:
                recon_model(child, getattr(fp_module, name))

    sync()
    t1 = time.perf_counter()
    recon_model(model, fp_model)
    sync()
    recon_s = time.perf_counter() - t1
    q.state.enable_quantization(model)
    quant_top1 = float(q.utils.validate_model(val_loader, model))

    return {"peer": "qdrop", "model": "resnet18", "bits": a.bits, "iters": a.iters, "seed": a.seed,
            "device": dev.type, "threads": a.threads, "calib_size": len(calib), "eval_size": len(test_x),
            "fp_top1": round(fp_top1, 2), "pre_recon_top1": round(pre_recon_top1, 2), "quant_top1": round(quant_top1, 2),
            "calib_seconds": round(observer_s + recon_s, 2), "observer_seconds": round(observer_s, 2),
            "recon_seconds": round(recon_s, 2), "wall_seconds": round(time.perf_counter() - t_start, 1),
            "peer_commit": peer_commit(peer), "peer_config": CONFIG, "config": cfg, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None, "cpu": cpu_model(),
            "python": platform.python_version(), "host": platform.node(), "commit": code_version()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-dir", type=Path, required=True, help="an exported tree of wimh966/QDrop branch qdrop")
    p.add_argument("--bits", default="W2A4", choices=BITS)
    p.add_argument("--iters", type=int, default=20000, help="reconstruction iterations per block (their config: 20000)")
    p.add_argument("--seed", type=int, default=1005, help="their config's seed: 1005")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--data-dir", type=Path, default=WORK, help="where the PNG zips are (made if missing)")
    p.add_argument("--reference-dir", type=Path, default=REFERENCE, help="where fmnist_resnet18.safetensors is")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate this many test images (smoke runs)")
    p.add_argument("--resize", type=int, default=None, help="resize the 28 px images to this size (e.g. 224 for the large-input timing)")
    p.add_argument("--out", type=Path, required=True, help="JSONL file; one row is appended per run")
    a = p.parse_args(argv)
    cmd = shlex.join(["python", "-m", "bench.peer_qdrop", *(argv if argv is not None else sys.argv[1:])])
    if a.device == "cpu":
        with cuda_calls_stay_on_cpu():
            row = run(a)
    else:
        row = run(a)
    row["cmd"] = cmd
    row["cpu_count"] = os.cpu_count()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("bits", "iters", "fp_top1", "pre_recon_top1", "quant_top1", "calib_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
