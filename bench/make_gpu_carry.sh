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
pins=$(python -c 'from importlib.metadata import version as v
print(" ".join(f"{p}=={v(p)}" for p in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")))')
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_17_x86_64 -d .gpu/whl $pins
cp ../shared/reference/fmnist_resnet18.* ../shared/reference/fmnist_mobilenet_v2.* .gpu/
python -c 'from pathlib import Path; from bench.accuracy import prepare_data; prepare_data(Path(".gpu"))'
du -sh .gpu && ls .gpu .gpu/whl
