#!/usr/bin/env bash
# Builds .gpu/, what a device call carries (device tool: carry [".gpu"], ~35 MB) for the
# bench/gpu_*.sh scripts: the device image has torch and torchvision but not pydantic, and
# reaches no package registry, so the wheels for its Python go along, with the reference
# models and the two Fashion-MNIST PNG zips. Run here (needs the registry and shared/).
#   bash bench/make_gpu_carry.sh [python version of the device image, default 3.12]
set -eu
cd "$(dirname "$0")/.."
PY=${1:-3.12}
rm -rf .gpu/whl && mkdir -p .gpu/whl  # stale wheels of another version would clash at install
# the versions installed here, so the device runs what the tests ran
# pydantic for the library; matplotlib (report.html's figures) and pytest (the device runs the
# CUDA cases of tests/test_recon_step.py) with their dependencies the image lacks
pins=$(python -c 'from importlib.metadata import version as v
print(" ".join(f"{p}=={v(p)}" for p in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
  "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "python-dateutil", "six", "packaging",
  "pytest", "pluggy", "iniconfig", "jinja2", "markupsafe", "safetensors")))')
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .gpu/whl $pins  # 2_28: contourpy 1.3.3 has no older tag
cp ../shared/reference/fmnist_resnet18.* ../shared/reference/fmnist_mobilenet_v2.* .gpu/
python -c 'from pathlib import Path; from bench.accuracy import prepare_data; prepare_data(Path(".gpu"))'
# the tests' Fashion-MNIST (bench.fmnist, $CLCALIB_FMNIST_DIR): the first 1024 train images and
# the test split as IDX files (4 MB; the whole train split would not fit the carry)
python - <<'PY'
import gzip
from pathlib import Path
from bench.fmnist import FMNIST
dest = Path(".gpu/fmnist"); dest.mkdir(parents=True, exist_ok=True)
for name, keep in (("train", 1024), ("t10k", None)):
    for kind, header in (("images-idx3", 16), ("labels-idx1", 8)):
        data = gzip.open(FMNIST / f"{name}-{kind}-ubyte.gz").read()
        n = int.from_bytes(data[4:8], "big") if keep is None else keep
        row = (len(data) - header) // int.from_bytes(data[4:8], "big")
        out = data[:4] + n.to_bytes(4, "big") + data[8:header] + data[header : header + n * row]
        (dest / f"{name}-{kind}-ubyte.gz").write_bytes(gzip.compress(out))
PY
du -sh .gpu && ls .gpu .gpu/whl
